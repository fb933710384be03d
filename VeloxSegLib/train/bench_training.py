"""Training-speed section of ``veloxseg bench``."""
from .trainer import training_benchmark as run  # noqa: F401
