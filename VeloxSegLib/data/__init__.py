"""Image data: reading and validating volumes (``io``), physical-space alignment
(``alignment``), per-channel intensity normalization (``normalization``), and the dataset
helpers (nnU-Net format, phantoms, sampling) used by training.

Submodules are imported on demand; importing this package loads nothing heavy.
"""
