"""Headless VeloxSeg: segment image files into .seg.nrrd files, in Slicer or in plain Python.

In Slicer::

    Slicer --no-splash --no-main-window --python-script VeloxSegBatch.py -- \\
        --model petct-lesion-demo --input CT.nii.gz PET.nii.gz --output seg.seg.nrrd

With plain Python and the slicer-core wheel::

    python VeloxSegExtension/VeloxSegBatch.py --model BUNDLE --input CT.nii.gz PET.nii.gz --output seg.seg.nrrd

``--input`` may instead be one folder of cases (nnU-Net naming ``CASE_0000.nii.gz``, ``CASE_0001.nii.gz``
or one sub-folder per case); ``--output`` is then a folder receiving ``CASE.seg.nrrd``. The exit code is
0 on success; on failure one line goes to stderr and the code is non-zero (2 input, 3 model,
4 configuration, 130 cancelled, 1 otherwise).

Installed with the extension this file sits among Slicer's scripted modules, so it also defines a
hidden, empty module of its own name when loaded by Slicer's module factory.
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def _bootstrap_paths():
    """Make VeloxSegLogic (next to this file) and VeloxSegLib (next to it or one folder up) importable."""
    for folder in (HERE, os.path.dirname(HERE)):
        if folder not in sys.path and (os.path.isdir(os.path.join(folder, "VeloxSegLogic"))
                                       or os.path.isdir(os.path.join(folder, "VeloxSegLib"))):
            sys.path.insert(0, folder)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="VeloxSegBatch", description="Segment images with a VeloxSeg model into .seg.nrrd files.")
    parser.add_argument("-m", "--model", required=True, nargs="+",
                        help="model name (embedded or user) or bundle folder/zip; several predict together as one "
                             "ensemble, as veloxseg predict -m does (cross-validation folds, or configurations of "
                             "other spacings or windows)")
    parser.add_argument("-i", "--input", nargs="+", required=True, help="one image per model input, or one folder of cases")
    parser.add_argument("-o", "--output", required=True, help=".seg.nrrd file, or a folder for a folder of cases")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--overlap", type=float, default=None, help="sliding-window overlap (default: the model's)")
    parser.add_argument("--tta", action="store_true",
                        help="mirror test-time augmentation along the axes the model was mirrored along in training")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="CPU arithmetic: bf16 is faster on CPUs with AVX512-BF16 or AMX (see docs/inference.md)")
    parser.add_argument("--no-pet-refine", dest="pet_refine", action="store_false",
                        help="turn off the model's PET border refinement (on for petct-lesion-demo)")
    parser.add_argument("--subprocess", action="store_true", help="run the network in a child process (as the panel does)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("-q", "--quiet", action="store_true")
    return parser.parse_args(argv)


def find_case_inputs(folder, info):
    """[(case_id, [paths in channel order])] from an nnU-Net-style folder or one sub-folder per case."""
    from VeloxSegLogic.bundles import guess_inputs
    from VeloxSegLogic.errors import InputError

    n = len(info.channels)
    subfolders = sorted(e for e in os.listdir(folder) if os.path.isdir(os.path.join(folder, e)) and not e.startswith("."))
    if subfolders:
        cases = []
        for case in subfolders:
            files = sorted(f for f in os.listdir(os.path.join(folder, case)) if f.lower().endswith(IMAGE_ENDINGS))
            if len(files) != n:
                raise InputError(f"{os.path.join(folder, case)}: expected {n} image(s) ({', '.join(info.channel_names)}), found {len(files)}")
            order = guess_inputs(info.channels, files)
            cases.append((case, [os.path.join(folder, case, files[i]) for i in order]))
        return cases
    from VeloxSegLib.infer.pipeline import find_cases

    return [(case, [str(p) for p in paths]) for case, paths, _ in find_cases(folder, n, info.channel_names)]


def segment_files(logic, info, paths, output, args, log):
    from VeloxSegLogic import SegmentationRequest
    from VeloxSegLogic.errors import InputError
    from VeloxSegLogic.segmentation import save_segmentation
    from VeloxSegLogic.volumes import read_volume

    if len(paths) != len(info.channels):
        raise InputError(f"model '{info.name}' needs {len(info.channels)} input(s) in this order: {', '.join(info.channel_names)}; got {len(paths)}")
    if os.path.exists(output) and not args.overwrite:
        raise InputError(f"{output} exists (use --overwrite)")
    scene = logic.scene
    nodes = [read_volume(p, scene) for p in paths]
    try:
        def progress(record):
            if not args.quiet and record.get("stage") not in (None, "done"):
                log(f"  {record.get('stage')}: {100 * float(record.get('fraction', 0)):.0f}%")

        request = SegmentationRequest(bundle=info.path, ensemble_with=list(args.model[1:]), input_nodes=nodes,
                                      device=args.device, overlap=args.overlap,
                                      tta=args.tta, precision=args.precision, pet_refine=args.pet_refine,
                                      output_name=os.path.basename(output).split(".")[0])
        node = logic.segment(request, in_process=not args.subprocess, progress=progress)
        save_segmentation(node, output)
        scene.RemoveNode(node)
    finally:
        for volume in nodes:
            scene.RemoveNode(volume)


def main(argv=None):
    _bootstrap_paths()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # Slicer --python-script SCRIPT -- ARGS may pass the separator through
        argv = argv[1:]
    args = parse_args(argv)
    from VeloxSegLogic import VeloxSegCoreLogic
    from VeloxSegLogic.errors import InputError, VeloxSegError

    def log(message):
        if not args.quiet:
            print(message, flush=True)

    try:
        logic = VeloxSegCoreLogic()
        info = logic.bundle_info(args.model[0])
        if len(args.input) == 1 and os.path.isdir(args.input[0]):
            cases = find_case_inputs(args.input[0], info)
            if os.path.exists(args.output) and not os.path.isdir(args.output):
                raise InputError(f"{args.output} must be a folder when --input is a folder")
            outputs = [os.path.join(args.output, f"{case}.seg.nrrd") for case, _ in cases]
            if not args.overwrite:  # every case is checked before the first one runs
                existing = [o for o in outputs if os.path.exists(o)]
                if existing:
                    raise InputError(f"{existing[0]} exists (use --overwrite)"
                                     + (f"; so do {len(existing) - 1} more" if len(existing) > 1 else ""))
            created = not os.path.isdir(args.output)
            os.makedirs(args.output, exist_ok=True)
            try:
                for (case, paths), output in zip(cases, outputs):
                    log(f"{case}: {', '.join(os.path.basename(p) for p in paths)}")
                    segment_files(logic, info, paths, output, args, log)
            except BaseException:  # the finished cases stay (each file is whole); an empty new folder goes
                if created and not os.listdir(args.output):
                    os.rmdir(args.output)
                raise
            log(f"wrote {len(cases)} segmentation(s) to {args.output}")
        else:
            if not args.output.lower().endswith(".seg.nrrd"):
                raise InputError(f"--output must end with .seg.nrrd, got {args.output}")
            segment_files(logic, info, args.input, args.output, args, log)
            log(f"wrote {args.output}")
        return 0
    except VeloxSegError as exc:
        print(f"VeloxSegBatch: error: {exc}", file=sys.stderr, flush=True)
        return getattr(exc, "exit_code", 1)
    except KeyboardInterrupt:
        print("VeloxSegBatch: cancelled", file=sys.stderr, flush=True)
        return 130
    except ImportError as exc:
        if exc.name == "torch":
            hint = ("install the PyTorch extension from the Extensions Manager and press Apply once in the VeloxSeg "
                    "panel (it installs torch), or run 'PythonSlicer -m pip install torch'")
        else:
            hint = ("press Apply once in the VeloxSeg panel (it installs what is missing) or run "
                    "'PythonSlicer -m pip install -r Resources/requirements.txt'")
        print(f"VeloxSegBatch: error: missing Python package '{exc.name}': {hint}", file=sys.stderr, flush=True)
        return 1


def _run():
    """main() with a guaranteed exit code: Slicer keeps running after an uncaught exception."""
    try:
        return main()
    except SystemExit as exc:  # argparse --help / usage errors
        return exc.code if isinstance(exc.code, int) else 2
    except Exception:  # a bug: the traceback helps, the exit code still tells the caller
        import traceback

        traceback.print_exc()
        return 1


def _exit(code):
    try:
        import slicer
    except ImportError:
        slicer = None
    if slicer is not None and getattr(slicer, "app", None) is not None:
        slicer.util.exit(code)
    else:
        sys.exit(code)


if __name__ == "__main__":
    _exit(_run())
else:
    try:  # loaded by Slicer's scripted module factory: register as a hidden module, do nothing
        from slicer.ScriptedLoadableModule import ScriptedLoadableModule

        class VeloxSegBatch(ScriptedLoadableModule):
            def __init__(self, parent):
                ScriptedLoadableModule.__init__(self, parent)
                self.parent.title = "VeloxSegBatch"
                self.parent.categories = ["Segmentation"]
                self.parent.hidden = True
                self.parent.helpText = "Command-line entry point: Slicer --python-script VeloxSegBatch.py -- --help"

    except ImportError:  # plain Python with slicer-core: no module machinery
        pass
