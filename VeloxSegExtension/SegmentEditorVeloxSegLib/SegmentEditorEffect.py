"""The "VeloxSeg" Segment Editor effect: run a VeloxSeg model on the editor's source volume.

Either all of the model's labels are added as segments, or the selected segment is replaced by
one label (undoable). Other installed models with the same inputs and labels can be ticked to
predict together with the chosen one (an ensemble, as in the module panel). The prediction
itself is the module's logic (``VeloxSegLogic``); this file holds only the effect's options and
how the result is applied.
"""
import os
import time

import qt
import slicer
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

MODE_ALL = "all"
MODE_SELECTED = "selected"


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    def __init__(self, scriptedEffect):
        scriptedEffect.name = "VeloxSeg"
        scriptedEffect.perSegment = False
        scriptedEffect.requireSegments = False
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.bundles = []
        self.extraSelectors = []

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        here = os.path.dirname(os.path.abspath(__file__))
        for folder in (os.path.dirname(here), os.path.dirname(os.path.dirname(here))):
            path = os.path.join(folder, "Resources", "Icons", "VeloxSeg.png")
            if os.path.exists(path):
                return qt.QIcon(path)
        return qt.QIcon()

    def helpText(self):
        return ("<html>Segment the source volume with a VeloxSeg model.<p>Pick the model and, for multi-input models, "
                "the other input volumes. <b>Ensemble with</b> lists the other models with the same inputs and labels: "
                "ticked ones predict together with the chosen model, as one ensemble. <b>Add all labels</b> creates "
                "one segment per label; <b>Replace selected segment</b> fills the selected segment with one label "
                "(Undo restores it).</html>")

    # -------------------------------------------------------------------------------- options
    def setupOptionsFrame(self):
        from VeloxSegLogic.bundles import list_bundle_infos

        self.bundles = list_bundle_infos()
        self.modelComboBox = qt.QComboBox()
        for info in self.bundles:
            self.modelComboBox.addItem(info.display_name)
        self.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.scriptedEffect.addLabeledOptionsWidget("Model:", self.modelComboBox)

        self.ensembleList = qt.QListWidget()
        self.ensembleList.setToolTip("Other models with the same inputs and labels: ticked ones predict together "
                                     "with the chosen model (veloxseg predict -m A B ...)")
        self.ensembleList.setMaximumHeight(80)
        self.scriptedEffect.addLabeledOptionsWidget("Ensemble with:", self.ensembleList)

        self.sourceRoleLabel = qt.QLabel()  # the source volume is always the model's first input
        self.scriptedEffect.addOptionsWidget(self.sourceRoleLabel)

        self.extraInputsFrame = qt.QWidget()
        self.extraInputsLayout = qt.QFormLayout(self.extraInputsFrame)
        self.extraInputsLayout.setContentsMargins(0, 0, 0, 0)
        self.scriptedEffect.addOptionsWidget(self.extraInputsFrame)

        self.allLabelsRadio = qt.QRadioButton("Add all labels as segments")
        self.selectedRadio = qt.QRadioButton("Replace selected segment with label:")
        self.labelComboBox = qt.QComboBox()
        modeGroup = qt.QButtonGroup(self.extraInputsFrame)
        modeGroup.addButton(self.allLabelsRadio)
        modeGroup.addButton(self.selectedRadio)
        self.scriptedEffect.addOptionsWidget(self.allLabelsRadio)
        row = qt.QHBoxLayout()
        row.addWidget(self.selectedRadio)
        row.addWidget(self.labelComboBox)
        self.scriptedEffect.addOptionsWidget(row)

        self.deviceComboBox = qt.QComboBox()
        for text, value in (("Auto", "auto"), ("CPU", "cpu"), ("GPU (CUDA)", "cuda")):
            self.deviceComboBox.addItem(text, value)
        self.scriptedEffect.addLabeledOptionsWidget("Device:", self.deviceComboBox)

        self.applyButton = qt.QPushButton("Apply")
        self.applyButton.objectName = self.__class__.__name__ + "Apply"
        self.applyButton.setToolTip("Run the model on the source volume")
        self.scriptedEffect.addOptionsWidget(self.applyButton)

        for widget, signal in ((self.allLabelsRadio, "toggled(bool)"), (self.selectedRadio, "toggled(bool)"),
                               (self.labelComboBox, "currentIndexChanged(int)"), (self.deviceComboBox, "currentIndexChanged(int)"),
                               (self.ensembleList, "itemChanged(QListWidgetItem*)")):
            widget.connect(signal, self.updateMRMLFromGUI)
        self.applyButton.connect("clicked()", self.onApply)
        self.onModelChanged(self.modelComboBox.currentIndex)

    def currentBundle(self):
        index = self.modelComboBox.currentIndex
        return self.bundles[index] if 0 <= index < len(self.bundles) else None

    def savedEnsemble(self):
        from VeloxSegLogic.parameters import paths_from_text

        if self.scriptedEffect.parameterSetNode() is None:
            return []
        return paths_from_text(self.scriptedEffect.parameter("EnsembleWith"))

    def rebuildEnsembleList(self, chosen):
        """The models that can predict together with the chosen one, ticked where ``chosen`` (paths) lists them."""
        from VeloxSeg import fillModelChecklist
        from VeloxSegLogic.bundles import ensemble_partners

        bundle = self.currentBundle()
        partners = ensemble_partners(self.bundles, bundle) if bundle is not None else []
        wasBlocked = self.ensembleList.blockSignals(True)
        try:
            fillModelChecklist(self.ensembleList, partners, chosen)
        finally:
            self.ensembleList.blockSignals(wasBlocked)

    def ensemblePaths(self):
        """Paths of the ticked models, in list order."""
        from VeloxSeg import checkedPaths

        return checkedPaths(self.ensembleList)

    def _sourceVolume(self):
        node = self.scriptedEffect.parameterSetNode()
        if node is None:
            return None
        return node.GetSourceVolumeNode() if hasattr(node, "GetSourceVolumeNode") else node.GetMasterVolumeNode()

    def activate(self):
        """Models imported or fine-tuned since the editor opened show up when the effect is chosen."""
        from VeloxSegLogic.bundles import bundle_index, list_bundle_infos

        bundles = list_bundle_infos()
        if [b.path for b in bundles] == [b.path for b in self.bundles]:
            return
        current = self.currentBundle()
        self.bundles = bundles
        wasBlocked = self.modelComboBox.blockSignals(True)
        self.modelComboBox.clear()
        for info in self.bundles:
            self.modelComboBox.addItem(info.display_name)
        index = bundle_index(self.bundles, path=current.path) if current is not None else -1
        self.modelComboBox.setCurrentIndex(max(0, index) if self.bundles else -1)
        self.modelComboBox.blockSignals(wasBlocked)
        self.onModelChanged(self.modelComboBox.currentIndex)

    def onModelChanged(self, index):
        for selector in self.extraSelectors:
            self.extraInputsLayout.removeRow(selector)
        self.extraSelectors = []
        self.labelComboBox.clear()
        self.rebuildEnsembleList(self.savedEnsemble())  # models that cannot join this one drop out
        bundle = self.currentBundle()
        self.sourceRoleLabel.text = (f"Source volume is used as: {bundle.channel_names[0]}" if bundle is not None else "")
        if bundle is not None:
            from VeloxSegLogic.bundles import guess_inputs

            source = self._sourceVolume()
            volumes = [n for n in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                       if not n.IsA("vtkMRMLLabelMapVolumeNode") and n is not source]
            guesses = guess_inputs(bundle.channels[1:], [v.GetName() for v in volumes])
            for i, name in enumerate(bundle.channel_names[1:]):
                selector = slicer.qMRMLNodeComboBox()
                selector.nodeTypes = ["vtkMRMLScalarVolumeNode"]
                selector.showChildNodeTypes = False
                selector.noneEnabled = True
                selector.addEnabled = False
                selector.removeEnabled = False
                selector.setMRMLScene(slicer.mrmlScene)
                selector.setCurrentNode(volumes[guesses[i]] if guesses[i] is not None else None)
                self.extraInputsLayout.addRow(f"{name}:", selector)
                self.extraSelectors.append(selector)
            for lab in bundle.labels:
                if int(lab["value"]) != 0:
                    self.labelComboBox.addItem(str(lab["name"]), int(lab["value"]))
        self.updateMRMLFromGUI()

    def setMRMLDefaults(self):
        self.scriptedEffect.setParameterDefault("Model", "")
        self.scriptedEffect.setParameterDefault("Mode", MODE_ALL)
        self.scriptedEffect.setParameterDefault("Label", "1")
        self.scriptedEffect.setParameterDefault("Device", "auto")
        self.scriptedEffect.setParameterDefault("EnsembleWith", "[]")

    def updateGUIFromMRML(self):
        from VeloxSegLogic.bundles import bundle_index

        # read every saved value first: a model change below writes the GUI's current ones back
        model = self.scriptedEffect.parameter("Model")
        mode = self.scriptedEffect.parameter("Mode")
        label = int(self.scriptedEffect.parameter("Label") or 1)
        device = self.scriptedEffect.parameter("Device")
        index = bundle_index(self.bundles, model)
        if index >= 0 and index != self.modelComboBox.currentIndex:
            wasBlocked = self.modelComboBox.blockSignals(True)
            self.modelComboBox.setCurrentIndex(index)
            self.modelComboBox.blockSignals(wasBlocked)
            self._restoring = True
            try:
                self.onModelChanged(index)
            finally:
                self._restoring = False
        for widget in (self.allLabelsRadio, self.selectedRadio, self.labelComboBox, self.deviceComboBox):
            widget.blockSignals(True)
        self.allLabelsRadio.checked = mode != MODE_SELECTED
        self.selectedRadio.checked = mode == MODE_SELECTED
        labelIndex = self.labelComboBox.findData(label)
        self.labelComboBox.setCurrentIndex(max(0, labelIndex))
        self.labelComboBox.enabled = mode == MODE_SELECTED
        self.deviceComboBox.setCurrentIndex(max(0, self.deviceComboBox.findData(device)))
        self.rebuildEnsembleList(self.savedEnsemble())  # (a restored model change writes nothing back)
        for widget in (self.allLabelsRadio, self.selectedRadio, self.labelComboBox, self.deviceComboBox):
            widget.blockSignals(False)
        self.applyButton.enabled = self.currentBundle() is not None

    def updateMRMLFromGUI(self, *unused):
        from VeloxSegLogic.parameters import paths_to_text

        if self.scriptedEffect.parameterSetNode() is None or getattr(self, "_restoring", False):
            return  # nothing to write to yet / the saved values are being restored
        bundle = self.currentBundle()
        self.scriptedEffect.setParameter("Model", bundle.name if bundle else "")
        self.scriptedEffect.setParameter("Mode", MODE_SELECTED if self.selectedRadio.checked else MODE_ALL)
        label = self.labelComboBox.currentData
        self.scriptedEffect.setParameter("Label", str(label if label is not None else 1))
        self.scriptedEffect.setParameter("Device", self.deviceComboBox.currentData or "auto")
        self.scriptedEffect.setParameter("EnsembleWith", paths_to_text(self.ensemblePaths()))
        self.labelComboBox.enabled = self.selectedRadio.checked

    # ---------------------------------------------------------------------------------- apply
    def onApply(self):
        from VeloxSegLogic import SegmentationRequest, VeloxSegCoreLogic
        from VeloxSegLogic.errors import VeloxSegError
        from VeloxSegLogic.segmentation import binary_oriented_image, import_label_array
        from VeloxSegLogic.volumes import remove_node

        parameterSetNode = self.scriptedEffect.parameterSetNode()
        source = (parameterSetNode.GetSourceVolumeNode() if hasattr(parameterSetNode, "GetSourceVolumeNode")
                  else parameterSetNode.GetMasterVolumeNode())
        segmentationNode = parameterSetNode.GetSegmentationNode()
        bundle = self.currentBundle()
        inputs = [source] + [s.currentNode() for s in self.extraSelectors]
        mode = self.scriptedEffect.parameter("Mode")
        if mode == MODE_SELECTED and not parameterSetNode.GetSelectedSegmentID():
            slicer.util.errorDisplay("Select the segment to replace first.")
            return
        modulePanel = slicer.modules.veloxseg.widgetRepresentation().self() if hasattr(slicer.modules, "veloxseg") else None
        if modulePanel is not None and not modulePanel.ensureDependencies():
            return
        others = self.ensemblePaths()
        request = SegmentationRequest(bundle=bundle.path, ensemble_with=others, input_nodes=inputs,
                                      device=self.scriptedEffect.parameter("Device"), output_kind="labelmap")
        logic = VeloxSegCoreLogic()
        what = bundle.name + (f" and {len(others)} more model(s)" if others else "")
        progress = slicer.util.createProgressDialog(labelText=f"Segmenting with {what}...", maximum=100)
        labelNode = None
        try:
            job = logic.start_segmentation(request)
            while job.running:
                job.poll()
                progress.setValue(int(100 * job.fraction))
                slicer.app.processEvents()
                if progress.wasCanceled:
                    job.cancel()
                time.sleep(0.05)
            if job.error:
                if job.error != "cancelled":
                    slicer.util.errorDisplay(f"VeloxSeg failed: {job.error}")
                return
            labelNode = job.result
            self.scriptedEffect.saveStateForUndo()
            if mode == MODE_SELECTED:
                value = int(self.scriptedEffect.parameter("Label") or 1)
                self.scriptedEffect.modifySelectedSegmentByLabelmap(
                    binary_oriented_image(labelNode, value, segmentationNode),
                    slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeSet)
            else:
                from VeloxSegLogic.volumes import array_from_volume

                import_label_array(segmentationNode, array_from_volume(labelNode), source, bundle.labels,
                                   model=bundle.name, keep_geometry=True)
        except VeloxSegError as exc:
            slicer.util.errorDisplay(f"VeloxSeg: {exc}")
        except Exception as exc:  # a bug or an OS error: a message, the details in the log
            import traceback

            slicer.util.errorDisplay(f"VeloxSeg failed: {exc}", detailedText=traceback.format_exc())
        finally:
            progress.close()
            if labelNode is not None:
                remove_node(labelNode)
