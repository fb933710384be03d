"""VeloxSegLib: the VeloxSeg network, training, inference and model bundles.

Never imports slicer, qt or vtk. Heavy modules (torch) are imported lazily so that
``import VeloxSegLib`` stays cheap for the Slicer module.
"""
__version__ = "0.1.0"

__all__ = ["build_model", "list_models", "__version__"]


def build_model(name="veloxseg-b", in_channels=(1, 1), num_classes=2, patch_size=(96, 96, 96), **overrides):
    """Build a network by preset name. See ``VeloxSegLib.model.build_model``."""
    from .model import build_model as _build

    return _build(name, in_channels=in_channels, num_classes=num_classes, patch_size=patch_size, **overrides)


def list_models():
    from .model import list_models as _list

    return _list()
