"""MRML-level logic of the VeloxSeg Slicer extension.

Works in the Slicer application and in a plain Python process with the ``slicer-core`` wheel.
Imports only ``slicer`` MRML classes and ``vtk`` (never ``qt``, ``ctk`` or ``slicer.app``);
torch and the network are only ever touched inside functions that run a prediction.
"""
from .core import CoreSession, core_session, in_slicer_app
from .errors import Cancelled, InputError, VeloxSegError
from .logic import SegmentationJob, SegmentationRequest, VeloxSegCoreLogic

__all__ = [
    "Cancelled",
    "CoreSession",
    "InputError",
    "SegmentationJob",
    "SegmentationRequest",
    "VeloxSegCoreLogic",
    "VeloxSegError",
    "core_session",
    "in_slicer_app",
]
