"""One MRML scene and the Slicer module logics, in Slicer or in a plain Python process.

Inside the Slicer application the scene and logics already exist (``slicer.mrmlScene``,
``slicer.modules.<name>.logic()``) and are used as they are (no ``slicer.app``, no Qt).
With the ``slicer-core`` wheel nothing creates them, so
:func:`core_session` builds them once per process and sets ``slicer.mrmlScene``.
"""
from __future__ import annotations

import dataclasses
import logging

log = logging.getLogger(__name__)

_SESSION = None


def in_slicer_app() -> bool:
    """True inside the Slicer application (its loaded modules are there), False with slicer-core only."""
    import slicer

    modules = getattr(slicer, "modules", None)
    return modules is not None and hasattr(modules, "volumes") and hasattr(modules, "segmentations")


@dataclasses.dataclass
class CoreSession:
    scene: object
    app_logic: object
    volumes_logic: object
    segmentations_logic: object


def core_session() -> CoreSession:
    """The process-wide scene and logics (created on first call when Slicer's app is absent)."""
    global _SESSION
    import slicer

    if _SESSION is not None and _SESSION.scene is getattr(slicer, "mrmlScene", None):
        return _SESSION
    if in_slicer_app():
        volumes = slicer.modules.volumes.logic()
        _SESSION = CoreSession(
            scene=slicer.mrmlScene,
            app_logic=volumes.GetMRMLApplicationLogic(),
            volumes_logic=volumes,
            segmentations_logic=slicer.modules.segmentations.logic(),
        )
        return _SESSION
    scene = getattr(slicer, "mrmlScene", None)
    if scene is None:
        scene = slicer.vtkMRMLScene()
        slicer.mrmlScene = scene
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    colors = slicer.vtkMRMLColorLogic()  # default colour tables without the files search
    colors.SetMRMLApplicationLogic(app_logic)
    colors.SetMRMLScene(scene)
    app_logic.SetColorLogic(colors)
    volumes = slicer.vtkSlicerVolumesLogic()
    volumes.SetMRMLApplicationLogic(app_logic)
    volumes.SetMRMLScene(scene)
    segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations.SetMRMLApplicationLogic(app_logic)
    segmentations.SetMRMLScene(scene)
    _SESSION = CoreSession(scene, app_logic, volumes, segmentations)
    _SESSION._keep = [colors]  # the app logic holds a weak link only
    log.debug("created a slicer-core session")
    return _SESSION
