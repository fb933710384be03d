"""Segmenting volume nodes with a VeloxSeg bundle: inputs out, prediction, segments back in.

Two ways to run the network, one data path:
- as a subprocess of the current Python (``python -m VeloxSegLib.cli predict --progress json``):
  the panel and the effect use it, so a crash or an out-of-memory never takes Slicer down and
  Cancel ends the whole process tree;
- in-process through VeloxSegLib's pipeline (batch, where there is no UI to keep alive).
Either way the inputs are the channel volumes resampled onto the first channel's grid, and the
label map comes back on that grid.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile

from .errors import Cancelled, InputError, VeloxSegError

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")


@dataclasses.dataclass
class SegmentationRequest:
    bundle: str  # bundle folder/zip path or model name
    input_nodes: list  # volume nodes, in the bundle's channel order
    # more bundles (paths or names) that predict together with ``bundle``, as ``veloxseg predict
    # -m BUNDLE MORE...`` does: folds averaged in every window, other configurations (spacings,
    # windows) averaged as probabilities. They must take the same inputs and give the same labels.
    ensemble_with: list = dataclasses.field(default_factory=list)
    output_node: object = None  # vtkMRMLSegmentationNode, or None to create one
    device: str = "auto"
    overlap: float | None = None  # None: the bundle's default
    tta: bool = False
    precision: str = "fp32"  # "bf16": opt-in bfloat16 on CPUs that run it natively
    # False turns off the model's PET border refinement (inference.pet_refine); True keeps the
    # model's setting (on for petct-lesion-demo, nothing for models without one)
    pet_refine: bool = True
    output_name: str | None = None
    # "segmentation": import into output_node; "labelmap": return a label map node on the first
    # input's grid (the Segment Editor effect applies it itself; the caller removes the node)
    output_kind: str = "segmentation"

    def validate(self, info=None):
        if self.output_kind not in ("segmentation", "labelmap"):
            raise InputError("output_kind must be 'segmentation' or 'labelmap'")
        if not self.input_nodes or any(n is None for n in self.input_nodes):
            raise InputError("select a volume for every input")
        if info is not None and len(self.input_nodes) != len(info.channels):
            raise InputError(f"model '{info.name}' needs {len(info.channels)} inputs ({', '.join(info.channel_names)}), got {len(self.input_nodes)}")
        seen = {}
        names = info.channel_names if info is not None else [f"input {i + 1}" for i in range(len(self.input_nodes))]
        for name, node in zip(names, self.input_nodes):  # one volume for two inputs runs and gives garbage
            if node.GetID() in seen:
                raise InputError(f"volume '{node.GetName()}' is selected as both {seen[node.GetID()]} and {name}; "
                                 "each input needs its own volume")
            seen[node.GetID()] = name
        if info is not None:  # volumes named, say, T2, T1, T1ce, FLAIR for a T1, T1ce, T2, FLAIR model
            from VeloxSegLib.infer.checks import input_order_problems

            certain, problems = input_order_problems([n.GetName() for n in self.input_nodes], info.channel_names)
            if certain:
                raise InputError(f"the volumes' names give another order: {'; '.join(problems)}; model "
                                 f"'{info.name}' expects {', '.join(info.channel_names)} in this order")
        if self.device not in DEVICES:
            raise InputError(f"device must be one of {', '.join(DEVICES)}")
        if self.overlap is not None and not 0.0 <= float(self.overlap) < 1.0:
            raise InputError("overlap must be in [0, 1)")
        if self.precision not in PRECISIONS:
            raise InputError(f"precision must be one of {', '.join(PRECISIONS)}")
        for node in self.input_nodes:
            if node.GetImageData() is None:
                raise InputError(f"volume '{node.GetName()}' has no image data")


def write_inputs(input_nodes, folder: str) -> list:
    """Write the channels as NIfTI, all on the first channel's grid (others resampled in physical space)."""
    from .volumes import remove_node, resample_to_reference, same_geometry, write_volume

    reference = input_nodes[0]
    scene = reference.GetScene()
    paths = []
    for index, node in enumerate(input_nodes):
        path = os.path.join(folder, f"input_{index:04d}.nii.gz")
        if index == 0 or same_geometry(node, reference):
            write_volume(node, path)
        else:
            resampled = resample_to_reference(node, reference, scene, name="__veloxseg_resampled__")
            try:
                write_volume(resampled, path)
            finally:
                remove_node(resampled)
        paths.append(path)
    return paths


def predict_command(bundle_path, input_paths, output_path, device="auto", overlap=None, tta=False, precision="fp32",
                    pet_refine=True, ensemble_with=()):
    """The argument list of ``veloxseg predict`` run by the current Python. ``pet_refine``
    False adds ``--no-pet-refine``; True leaves the bundle's setting. ``ensemble_with``: more
    bundle paths, predicting with the first as one ensemble."""
    from .process import python_executable

    args = [python_executable(), "-m", "VeloxSegLib.cli", "predict", "-m", bundle_path, *ensemble_with,
            "-i", *input_paths,
            "-o", output_path, "--device", device, "--progress", "json", "--overwrite"]
    if overlap is not None:
        args += ["--overlap", f"{float(overlap):g}"]
    if tta:
        args.append("--tta")
    if precision != "fp32":
        args += ["--precision", precision]
    if not pet_refine:
        args.append("--no-pet-refine")
    return args


def predict_in_process(bundle_path, images, device="auto", overlap=None, tta=False, progress=None, cancel=None,
                       precision="fp32", pet_refine=True, ensemble_with=()):
    """Adapter to VeloxSegLib's in-process prediction: SimpleITK images in, uint8 label image out.
    ``ensemble_with``: more bundle paths, predicting with the first as one ensemble.

    ``progress(dict)`` receives records shaped like the CLI's JSON lines ({"stage", "fraction"});
    ``cancel()`` returning True stops the run (VeloxSegLib raises Cancelled).
    """
    from VeloxSegLib.infer.pipeline import predict_case

    def report(stage, fraction):
        progress({"stage": stage, "fraction": float(fraction)})

    model = [bundle_path, *ensemble_with] if ensemble_with else bundle_path
    result = predict_case(model, list(images), device=device, overlap=overlap, tta=bool(tta), precision=precision,
                          pet_refine=None if pet_refine else False,
                          progress=report if progress is not None else None, cancel=cancel)
    return result.labels


class SegmentationJob:
    """A running segmentation (subprocess). Drive it with :meth:`poll` (UI timer) or :meth:`wait`.

    Callbacks: ``on_progress(fraction, stage, record)``, ``on_log(line)``,
    ``on_done(segmentation_node_or_None, error_message_or_None)``.
    """

    def __init__(self, logic, request, info, on_progress=None, on_log=None, on_done=None, keep_temp=False,
                 ensemble_paths=()):
        self.logic = logic
        self.request = request
        self.info = info
        self.ensemble_paths = list(ensemble_paths)  # the bundles predicting together with ``info``
        self.on_progress = on_progress
        self.on_log = on_log
        self.on_done = on_done
        self.keep_temp = keep_temp
        self.fraction = 0.0
        self.stage = "starting"
        self.result = None
        self.error = None
        self.runner = None
        self.temp_dir = tempfile.mkdtemp(prefix="veloxseg-")
        self.output_path = os.path.join(self.temp_dir, "prediction.nii.gz")

    def start(self):
        from .process import ProcessRunner, library_env

        try:
            self._log(f"writing {len(self.request.input_nodes)} input volume(s) to {self.temp_dir}")
            inputs = write_inputs(self.request.input_nodes, self.temp_dir)
            args = predict_command(self.info.path, inputs, self.output_path, self.request.device,
                                   self.request.overlap, self.request.tta, self.request.precision, self.request.pet_refine,
                                   ensemble_with=self.ensemble_paths)
            self._log(" ".join(args))
            self.runner = ProcessRunner(args, env=library_env(), on_progress=self._progress, on_log=self._log,
                                        on_finished=self._finished)
            self.runner.start()
        except BaseException:  # nothing started: the patient's volumes written so far go too
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            raise
        return self

    @property
    def running(self):
        return self.runner is not None and self.runner.running

    @property
    def elapsed(self):
        return self.runner.elapsed if self.runner else 0.0

    def poll(self):
        return self.runner.poll() if self.runner else False

    def wait(self, timeout=None):
        self.runner.wait(timeout=timeout)
        if self.error:
            raise (Cancelled(self.error) if self.runner.cancelled else VeloxSegError(self.error))
        return self.result

    def cancel(self):
        if self.runner:
            self.runner.cancel()

    def shutdown(self, timeout=10.0):
        """Cancel and finish now (scene close, application exit): no result is imported, the
        temporary folder is removed, and ``on_done`` is not called."""
        self.on_done = self.on_progress = self.on_log = None
        if self.runner:
            self.runner.shutdown(timeout)
        elif not self.keep_temp:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _log(self, line):
        log.debug(line)
        if self.on_log:
            self.on_log(line)

    def _progress(self, record):
        try:
            self.fraction = max(0.0, min(1.0, float(record.get("fraction", self.fraction))))
        except (TypeError, ValueError):
            pass
        self.stage = str(record.get("stage", self.stage))
        if self.on_progress:
            self.on_progress(self.fraction, self.stage, record)

    def _finished(self, returncode, message):
        try:
            if self.runner.cancelled:
                self.error = "cancelled"
            elif returncode != 0:
                self.error = message or f"prediction failed (exit code {returncode})"
            else:
                self.result = self.logic.import_prediction_file(self.output_path, self.request, self.info)
        except VeloxSegError as exc:
            self.error = str(exc)
        except Exception as exc:  # e.g. an input or output node removed meanwhile: report, never raise from poll()
            log.exception("importing the segmentation failed")
            self.error = f"importing the segmentation failed: {exc}"
        finally:
            if not self.keep_temp:
                shutil.rmtree(self.temp_dir, ignore_errors=True)
        if self.on_done:
            self.on_done(self.result, self.error)


class VeloxSegCoreLogic:
    """What the panel, the effect and the batch script call. No Qt."""

    def __init__(self, session=None):
        from .core import core_session

        self.session = session or core_session()

    @property
    def scene(self):
        return self.session.scene

    # -- models --------------------------------------------------------------------------------
    def bundle_info(self, name_or_path):
        from .bundles import resolve_bundle

        return resolve_bundle(name_or_path)

    # -- segmentation --------------------------------------------------------------------------
    def ensemble_infos(self, request, info) -> list:
        """The bundles of ``request.ensemble_with``, each checked against ``info`` (the request's own
        bundle): the same inputs (names, in order) and labels, or an InputError naming both."""
        from .bundles import ensemble_mismatch

        others = [self.bundle_info(b) for b in request.ensemble_with]
        for other in others:
            why = ensemble_mismatch(info, other)
            if why:
                raise InputError(why)
        return others

    def start_segmentation(self, request, on_progress=None, on_log=None, on_done=None) -> SegmentationJob:
        info = self.bundle_info(request.bundle)
        request.validate(info)
        others = self.ensemble_infos(request, info)
        return SegmentationJob(self, request, info, on_progress, on_log, on_done,
                               ensemble_paths=[o.path for o in others]).start()

    def segment(self, request, in_process=False, progress=None, log_callback=None, cancel=None, timeout=None):
        """Run to completion and return the segmentation node (raises VeloxSegError on failure)."""
        info = self.bundle_info(request.bundle)
        request.validate(info)
        others = [o.path for o in self.ensemble_infos(request, info)]
        if not in_process:
            job = SegmentationJob(self, request, info,
                                  on_progress=(lambda f, s, r: progress(r)) if progress else None,
                                  on_log=log_callback, ensemble_paths=others)
            job.start()
            return job.wait(timeout=timeout)
        import SimpleITK as sitk  # noqa: F401  (VeloxSegLib needs it too)

        from .volumes import remove_node, resample_to_reference, same_geometry, volume_to_sitk

        reference = request.input_nodes[0]
        images = []
        for index, node in enumerate(request.input_nodes):
            if index == 0 or same_geometry(node, reference):
                images.append(volume_to_sitk(node))
            else:
                resampled = resample_to_reference(node, reference, self.scene, name="__veloxseg_resampled__")
                try:
                    images.append(volume_to_sitk(resampled))
                finally:
                    remove_node(resampled)
        label_image = predict_in_process(info.path, images, request.device, request.overlap, request.tta,
                                         progress=progress, cancel=cancel, precision=request.precision,
                                         pet_refine=request.pet_refine, ensemble_with=others)
        return self.import_prediction_image(label_image, request, info)

    def import_prediction_file(self, path, request, info):
        from .volumes import read_volume, remove_node

        if not os.path.isfile(path):
            raise VeloxSegError(f"the prediction did not produce {path}")
        label_node = read_volume(path, self.scene, name="__veloxseg_prediction__", label=True)
        try:
            return self._import_label_node(label_node, request, info)
        finally:
            remove_node(label_node)

    def import_prediction_image(self, image, request, info):
        from .volumes import remove_node, sitk_to_volume

        label_node = sitk_to_volume(image, scene=self.scene, name="__veloxseg_prediction__", label=True)
        try:
            return self._import_label_node(label_node, request, info)
        finally:
            remove_node(label_node)

    def _import_label_node(self, label_node, request, info):
        from .segmentation import create_segmentation_node, import_label_array
        from .volumes import add_volume_from_array, ijk_to_ras

        reference = request.input_nodes[0]
        labels = self._labels_on_reference(label_node, reference, info)
        if request.output_kind == "labelmap":
            node = add_volume_from_array(self.scene, labels, ijk_to_ras(reference, world=False),
                                         name=f"{reference.GetName()} {info.name} labels", label=True)
            if reference.GetParentTransformNode() is not None:
                node.SetAndObserveTransformNodeID(reference.GetParentTransformNodeID())
            return node
        node = request.output_node
        if node is None:
            node = create_segmentation_node(self.scene, request.output_name or f"{reference.GetName()} {info.name}", reference)
            request.output_node = node
        import_label_array(node, labels, reference, info.labels, model=info.name)
        return node

    def _labels_on_reference(self, label_node, reference, info):
        """The prediction as a uint8 array on the reference grid, checked against the bundle's labels."""
        import numpy as np

        from .volumes import array_from_volume, ijk_to_ras, remove_node, resample_to_reference

        labels = array_from_volume(label_node)
        if labels.shape != array_from_volume(reference).shape or not np.allclose(
                ijk_to_ras(label_node), ijk_to_ras(reference, world=True), atol=1e-3):
            # not on the reference grid (a library that resamples differently): bring it there
            moved = resample_to_reference(label_node, reference, self.scene, interpolator="nearest", default_value=0)
            try:
                labels = array_from_volume(moved)
            finally:
                remove_node(moved)
        values = {int(lab["value"]) for lab in info.labels}
        unknown = set(np.unique(labels).tolist()) - values
        if unknown:
            raise VeloxSegError(f"prediction has label values {sorted(unknown)} that model '{info.name}' does not define")
        return labels.astype(np.uint8)

    # -- devices -------------------------------------------------------------------------------
    @staticmethod
    def device_query_command() -> list:
        """A child Python that prints one JSON object: {"cuda", "name", "memory_gb", "torch"}.

        Torch is imported there, not in Slicer's process.
        """
        from .process import python_executable

        code = ("import json,torch;c=torch.cuda.is_available();"
                "p=torch.cuda.get_device_properties(0) if c else None;"
                "print(json.dumps({'cuda':c,'name':p.name if p else '','memory_gb':round(p.total_memory/2**30,1) if p else 0.0,"
                "'torch':torch.__version__}))")
        return [python_executable(), "-c", code]

    @classmethod
    def query_devices(cls, timeout=60.0) -> dict:
        """Blocking form of :meth:`device_query_command` (batch, tests)."""
        import json
        import subprocess

        from .process import library_env

        try:
            out = subprocess.run(cls.device_query_command(), capture_output=True, timeout=timeout, env=library_env())
        except (OSError, subprocess.TimeoutExpired) as exc:
            return {"cuda": False, "name": "", "memory_gb": 0.0, "error": str(exc)}
        if out.returncode != 0:
            last = out.stderr.decode("utf-8", errors="replace").strip().splitlines()
            return {"cuda": False, "name": "", "memory_gb": 0.0, "error": last[-1] if last else "torch not available"}
        try:
            return json.loads(out.stdout.decode("utf-8", errors="replace").strip().splitlines()[-1])
        except (ValueError, IndexError):
            return {"cuda": False, "name": "", "memory_gb": 0.0, "error": "could not query torch"}
