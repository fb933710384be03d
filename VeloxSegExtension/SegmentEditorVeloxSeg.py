"""Hidden module that registers the VeloxSeg effect in the Segment Editor at startup."""
import os

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModule


class SegmentEditorVeloxSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "SegmentEditorVeloxSeg"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["VeloxSeg contributors"]
        self.parent.hidden = True
        self.parent.helpText = "Adds the VeloxSeg effect to the Segment Editor."
        self.parent.acknowledgementText = "VeloxSeg is released under the Apache-2.0 license."
        slicer.app.connect("startupCompleted()", self.registerEditorEffect)

    def registerEditorEffect(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        instance = effects.qSlicerSegmentEditorScriptedEffect(None)
        source = os.path.join(os.path.dirname(__file__), "SegmentEditorVeloxSegLib", "SegmentEditorEffect.py")
        instance.setPythonSource(source.replace("\\", "/"))
        instance.self().register()
