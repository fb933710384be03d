"""Fine-tuning from the scene: cases -> nnU-Net raw dataset -> ``veloxseg finetune`` -> new bundle.

A case is one set of channel volumes plus a segmentation whose segments carry the bundle's
label names. The source bundle is never modified; the new one goes to the user models folder.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile

from .errors import InputError, VeloxSegError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class FineTuneCase:
    volume_nodes: list  # one per bundle channel, first = reference grid
    segmentation_node: object
    name: str = ""

    def case_name(self, index):
        base = self.name or self.volume_nodes[0].GetName()
        base = re.sub(r"[^A-Za-z0-9]+", "", base)[:24] or "case"
        return f"{base}{index:03d}"


def collect_cases(scene, channels: list) -> list:
    """Cases found in the scene: every segmentation with a reference volume, the other channels
    guessed by name among the volumes that share the reference's grid or name prefix."""
    from .bundles import guess_inputs

    volumes = [scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode") for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"))]
    volumes = [v for v in volumes if not v.IsA("vtkMRMLLabelMapVolumeNode") and not v.GetName().startswith("__")]
    cases = []
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")):
        seg = scene.GetNthNodeByClass(i, "vtkMRMLSegmentationNode")
        reference = seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole())
        if reference is None or not reference.IsA("vtkMRMLScalarVolumeNode"):
            continue
        if len(channels) == 1:
            cases.append(FineTuneCase([reference], seg))
            continue
        prefix = _prefix(reference.GetName())
        pool = [v for v in volumes if v is reference or _prefix(v.GetName()) == prefix] or volumes
        picked = guess_inputs(channels, [v.GetName() for v in pool])
        nodes = [pool[p] if p is not None else None for p in picked]
        if reference in pool and nodes[0] is not reference and reference not in nodes:
            nodes[0] = reference
        if all(n is not None for n in nodes) and len({id(n) for n in nodes}) == len(nodes):
            cases.append(FineTuneCase(nodes, seg))
    return cases


def _prefix(name):
    tokens = re.split(r"[^A-Za-z0-9]+", name)
    return tokens[0].lower() if tokens else name.lower()


def export_nnunet_dataset(cases, channels: list, labels: list, folder: str | None = None, dataset_name="VeloxSegFineTune") -> str:
    """Write ``cases`` as an nnU-Net raw dataset; returns the dataset folder.

    imagesTr/{case}_{0000..}.nii.gz (all channels on the first channel's grid), labelsTr/{case}.nii.gz
    (bundle label values), dataset.json (channel_names, labels, numTraining, file_ending).
    A refused case removes a folder this function made (not one passed in).
    """
    if not cases:
        raise InputError("add at least one case (volumes + segmentation) to fine-tune")
    created = folder is None
    folder = folder or tempfile.mkdtemp(prefix="veloxseg-finetune-")
    try:
        _export_cases(cases, channels, labels, folder, dataset_name)
    except BaseException:  # a refused case: no patient images stay behind in a temporary folder
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def _export_cases(cases, channels, labels, folder, dataset_name):
    import numpy as np

    from .logic import write_inputs
    from .segmentation import label_array_from_segmentation
    from .volumes import add_volume_from_array, ijk_to_ras, remove_node, write_volume

    images_dir = os.path.join(folder, "imagesTr")
    labels_dir = os.path.join(folder, "labelsTr")
    os.makedirs(images_dir, exist_ok=True)
    os.makedirs(labels_dir, exist_ok=True)
    names = set()
    for index, case in enumerate(cases):
        if len(case.volume_nodes) != len(channels) or any(v is None for v in case.volume_nodes):
            raise InputError(f"case {index + 1}: needs {len(channels)} volumes ({', '.join(str(c.get('name')) for c in channels)})")
        if case.segmentation_node is None:
            raise InputError(f"case {index + 1}: no segmentation")
        name = case.case_name(index)
        if name in names:
            raise InputError(f"two cases are named {name}")
        names.add(name)
        staging = tempfile.mkdtemp(prefix="case-", dir=folder)
        try:
            for channel, path in enumerate(write_inputs(case.volume_nodes, staging)):
                shutil.move(path, os.path.join(images_dir, f"{name}_{channel:04d}.nii.gz"))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        reference = case.volume_nodes[0]
        label_array = label_array_from_segmentation(case.segmentation_node, reference, labels)
        scene = reference.GetScene()
        label_node = add_volume_from_array(scene, label_array.astype(np.uint8), ijk_to_ras(reference), name="__veloxseg_label__", label=True)
        try:
            write_volume(label_node, os.path.join(labels_dir, f"{name}.nii.gz"))
        finally:
            remove_node(label_node)
    dataset = {
        "name": dataset_name,
        "channel_names": {str(i): str(c.get("modality") or c.get("name")) for i, c in enumerate(channels)},
        "labels": {str(lab["name"]): int(lab["value"]) for lab in labels},
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
    }
    if "background" not in dataset["labels"]:
        dataset["labels"] = {"background": 0, **{k: v for k, v in dataset["labels"].items() if v != 0}}
    with open(os.path.join(folder, "dataset.json"), "w", encoding="utf-8") as f:
        json.dump(dataset, f, indent=2)


def finetune_command(bundle_path, dataset_dir, output_bundle, epochs=None, lr=None, device="auto", work_dir=None):
    """The ``veloxseg finetune`` command line. The job passes a ``work_dir`` beside the exported
    cases (removed with them), so checkpoints never stay next to the new bundle in the models
    folder, where a stopped run would leave them and block the next run of the same name."""
    from .process import python_executable

    args = [python_executable(), "-m", "VeloxSegLib.cli", "finetune", "-m", bundle_path, dataset_dir, "-o", output_bundle]
    if work_dir:
        args += ["--work-dir", work_dir]
    args += ["--progress", "json"]
    if epochs is not None:
        args += ["--epochs", str(int(epochs))]
    if lr is not None:
        args += ["--lr", f"{float(lr):g}"]
    if device and device != "auto":
        args += ["--device", device]
    return args


class FineTuneJob:
    """``veloxseg finetune`` as a subprocess; progress records carry epoch, losses, lr, val_dice.

    ``on_epoch(record)`` for each finished epoch (records with an ``epoch`` key);
    ``on_progress(fraction, record)`` for step records (``fraction`` of the whole run);
    ``on_log(line)``; ``on_done(bundle_info_or_None, error_or_None)``. Stop ends the process
    tree; a partial output bundle is removed.
    """

    def __init__(self, bundle_path, cases, channels, labels, new_name, epochs=None, lr=None, device="auto",
                 models_dir=None, on_epoch=None, on_log=None, on_done=None, on_progress=None):
        from .bundles import check_model_name, user_dir

        self.bundle_path = bundle_path
        self.cases = cases
        self.channels = channels
        self.labels = labels
        self.new_name = check_model_name(new_name)
        self.models_dir = models_dir or user_dir()
        self.output_bundle = os.path.join(self.models_dir, self.new_name)
        if os.path.exists(self.output_bundle):
            raise InputError(f"a model named '{self.new_name}' already exists in {self.models_dir}")
        self.epochs, self.lr, self.device = epochs, lr, device
        self.start_dice = None
        self.on_epoch, self.on_log, self.on_done, self.on_progress = on_epoch, on_log, on_done, on_progress
        self.fraction = 0.0
        self.history = []
        self.runner = None
        self.result = None
        self.error = None
        self.dataset_dir = None
        self.temp_dir = None  # holds dataset_dir (the exported cases) and the run's work folder

    def start(self, command=None):
        """Export the cases and start the process. ``command(default_args) -> args`` may rewrite
        the command line (tests run a stand-in this way)."""
        from .process import ProcessRunner, library_env

        self.temp_dir = tempfile.mkdtemp(prefix="veloxseg-finetune-")
        try:
            self.dataset_dir = export_nnunet_dataset(self.cases, self.channels, self.labels,
                                                     os.path.join(self.temp_dir, "dataset"))
            os.makedirs(self.models_dir, exist_ok=True)
            args = finetune_command(self.bundle_path, self.dataset_dir, self.output_bundle, self.epochs, self.lr,
                                    self.device, work_dir=os.path.join(self.temp_dir, "work"))
            if command is not None:
                args = command(args)
            if self.on_log:
                self.on_log(" ".join(str(a) for a in args))
            self.runner = ProcessRunner(args, env=library_env(), on_progress=self._record, on_log=self.on_log,
                                        on_finished=self._finished).start()
        except BaseException:  # a refused case or a failed start: no patient images stay behind
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            raise
        return self

    @property
    def running(self):
        return self.runner is not None and self.runner.running

    def poll(self):
        return self.runner.poll() if self.runner else False

    def wait(self, timeout=None):
        self.runner.wait(timeout=timeout)
        if self.error:
            raise VeloxSegError(self.error)
        return self.result

    def stop(self):
        if self.runner:
            self.runner.cancel()

    def shutdown(self, timeout=10.0):
        """Stop and finish now (scene close, application exit): the partial bundle and the
        exported cases are removed; ``on_done`` is not called."""
        self.on_done = self.on_epoch = self.on_progress = self.on_log = None
        if self.runner:
            self.runner.shutdown(timeout)

    def _record(self, record):
        event = record.get("event")
        if event == "start_validation":  # the parent's Dice, validated before the first step
            self.start_dice = record.get("val_dice")
            if self.on_log and isinstance(self.start_dice, (int, float)):
                self.on_log(f"Starting weights: validation Dice {float(self.start_dice):.3f} "
                            f"(kept unless an epoch does better)")
            return
        if event == "message":
            if self.on_log:
                self.on_log(str(record.get("message", "")))
            return
        if event == "prepare":  # reading and preprocessing the cases, before the first step
            if self.on_progress:  # the training fraction stays where it is (0)
                self.on_progress(self.fraction, record)
            return
        if "epoch" in record:
            self.history.append(record)
            if self.on_epoch:
                self.on_epoch(record)
            return
        if isinstance(record.get("fraction"), (int, float)):
            self.fraction = max(0.0, min(1.0, float(record["fraction"])))
            if self.on_progress:
                self.on_progress(self.fraction, record)
        elif self.on_log:
            self.on_log(" ".join(f"{k}={v}" for k, v in record.items()))

    def _finished(self, returncode, message):
        from .bundles import read_bundle_info

        try:
            if self.runner.cancelled:
                self.error = "stopped"
            elif returncode != 0:
                self.error = message or f"fine-tuning failed (exit code {returncode})"
            else:
                self.result = read_bundle_info(self.output_bundle, "user")
        except VeloxSegError as exc:
            self.error = str(exc)
        except Exception as exc:  # never raise from poll()
            log.exception("reading the fine-tuned model failed")
            self.error = f"reading the fine-tuned model failed: {exc}"
        if self.error and os.path.isdir(self.output_bundle) and not os.path.isfile(os.path.join(self.output_bundle, "model.safetensors")):
            shutil.rmtree(self.output_bundle, ignore_errors=True)
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        if self.on_done:
            self.on_done(self.result, self.error)


class FineTunePlot:
    """A table + plot series + chart in the scene holding loss and validation Dice per epoch."""

    SERIES = (("loss", "Loss", (0.85, 0.3, 0.2)), ("val_dice", "Validation Dice", (0.2, 0.5, 0.9)))

    def __init__(self, scene, name="VeloxSeg fine-tuning"):
        import slicer
        import vtk

        self.scene = scene
        self.table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{name} table")
        for column in ("epoch",) + tuple(key for key, _, _ in self.SERIES):
            array = vtk.vtkDoubleArray()
            array.SetName(column)
            self.table.AddColumn(array)
        self.chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{name} chart")
        self.chart.SetTitle(name)
        self.chart.SetXAxisTitle("epoch")
        self.series = []
        for key, title, color in self.SERIES:
            series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", title)
            series.SetAndObserveTableNodeID(self.table.GetID())
            series.SetXColumnName("epoch")
            series.SetYColumnName(key)
            series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
            series.SetColor(*color)
            self.chart.AddAndObservePlotSeriesNodeID(series.GetID())
            self.series.append(series)

    def add(self, record: dict):
        def number(*keys):
            for key in keys:
                value = record.get(key)
                if isinstance(value, dict):  # loss parts: plot their total
                    value = value.get("total", sum(v for v in value.values() if isinstance(v, (int, float))))
                if isinstance(value, (int, float)):
                    return float(value)
            return float("nan")

        table = self.table.GetTable()
        row = table.InsertNextBlankRow()
        table.SetValue(row, 0, float(record.get("epoch", row)))
        table.SetValue(row, 1, number("loss", "train_loss", "losses"))
        table.SetValue(row, 2, number("val_dice", "dice"))
        table.Modified()
        self.table.Modified()

    def rows(self):
        table = self.table.GetTable()
        return [[table.GetValue(r, c).ToDouble() for c in range(table.GetNumberOfColumns())] for r in range(table.GetNumberOfRows())]
