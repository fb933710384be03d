"""Training: the planner (dataset fingerprint -> plans), and later the trainer, schedules and
distributed runs. Submodules are imported on demand; importing this package loads nothing heavy.
"""
