"""``veloxseg demo``: segment a freshly generated PET/CT phantom with the embedded demo model.

Generates one phantom case (seed never used in training), segments it with ``petct-lesion-demo``,
prints the lesion Dice against the phantom's truth and writes the segmentation and a PNG of
orthogonal CT and PET slices with the predicted (red) and true (green) contours.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

DEMO_SEED = 20261123  # never used for the training data of the embedded models (docs/training.md)


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="segment a synthetic PET/CT phantom with the demo model",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--output", "-o", default="demo_output", help="output folder (default: demo_output)")
    p.add_argument("--model", "-m", default="petct-lesion-demo", help="bundle name or path")
    p.add_argument("--seed", type=int, default=DEMO_SEED, help="phantom seed (default: a held-out seed)")
    p.add_argument("--case", type=int, default=0, help="phantom case index")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--threads", type=int, default=None, help="CPU threads")
    p.add_argument("--progress", choices=["auto", "bar", "json", "none"], default="auto",
                   help="auto (default): a bar when stderr is a terminal; json: JSON lines for the Slicer panel")
    p.set_defaults(func=run)


def run(args) -> int:
    import SimpleITK as sitk

    from ..bundle import load_bundle
    from ..data.io import write_image
    from ..data.phantom import generate_petct_case
    from ..infer.pipeline import predict_case
    from ..metrics import dice_score
    from ..viz import orthogonal_panel, write_png
    from .predict import make_progress

    start = time.perf_counter()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    bundle = load_bundle(args.model)
    ct, pet, truth, info = generate_petct_case(args.seed, args.case)
    case = f"phantom_s{args.seed}_c{args.case}"
    paths = {"ct": out / f"{case}_0000.nii.gz", "pet": out / f"{case}_0001.nii.gz",
             "truth": out / f"{case}_truth.nii.gz", "seg": out / f"{case}_seg.nii.gz", "png": out / f"{case}.png"}
    for key, image in (("ct", ct), ("pet", pet), ("truth", truth)):
        write_image(image, paths[key], overwrite=True)

    reporter = make_progress(args.progress, start)
    try:
        result = predict_case(bundle, [paths["ct"], paths["pet"]], device=args.device, threads=args.threads,
                              progress=reporter)
    finally:
        reporter.close()
    write_image(result.labels, paths["seg"], overwrite=True)

    pred = sitk.GetArrayFromImage(result.labels) == 1
    ref = sitk.GetArrayFromImage(truth) == 1
    dice = dice_score(pred, ref)
    pet_on_ct = sitk.GetArrayFromImage(sitk.Resample(pet, ct, sitk.Transform(), sitk.sitkLinear, 0.0))
    panel = orthogonal_panel(sitk.GetArrayFromImage(ct), pet_on_ct, ct.GetSpacing()[::-1], pred, ref)
    write_png(paths["png"], panel)
    seconds = time.perf_counter() - start
    stream = sys.stderr if args.progress == "json" else sys.stdout
    print(f"VeloxSeg demo: model {bundle.name} on a synthetic PET/CT phantom (seed {args.seed}, case {args.case}; "
          f"{len(info['lesions'])} lesion(s), {int(ref.sum())} lesion voxels)", file=stream)
    print(f"  lesion Dice {dice:.3f} against the phantom's truth; {seconds:.1f} s", file=stream)
    print(f"  segmentation: {paths['seg']}\n  picture:      {paths['png']} (red: predicted, green: truth)",
          file=stream)
    return 0
