import os

# Keep torch from oversubscribing the 2-core CI machine when several tests spawn processes.
os.environ.setdefault("OMP_NUM_THREADS", "2")
