"""``veloxseg phantom``: write a synthetic PET/CT or brain MRI dataset (nnU-Net raw format)."""
from __future__ import annotations

import time

from ..data.phantom import MRI_ANATOMIES, SCANNERS


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "phantom",
        help="write synthetic PET/CT or MRI phantom cases as an nnU-Net raw dataset",
        description=(
            "Write N synthetic cases as an nnU-Net v2 raw dataset (imagesTr, labelsTr, dataset.json). "
            "petct: CT (HU) + PET (SUV, on its own coarser grid), label 1 = lesions on the CT grid. "
            "mri: T1, T1ce, T2, FLAIR with labels 1 necrotic core, 2 edema, 3 enhancing tumour. "
            "Case i depends only on (seed, i)."
        ),
    )
    p.add_argument("--kind", required=True, choices=["petct", "mri"], help="phantom kind")
    p.add_argument("-n", "--num-cases", type=int, default=1, metavar="N", help="number of cases (default 1)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="dataset folder to create")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--size", type=int, nargs=3, metavar=("X", "Y", "Z"), default=None,
                   help="voxels of the (CT) grid; the field of view stays fixed, so smaller sizes mean "
                        "coarser spacing (default petct 128 128 96 at 3x3x3.5 mm, mri 96 96 96 at 2 mm)")
    p.add_argument("--scanner", default="default", choices=list(SCANNERS),
                   help="petct only: how the cases are imaged; the same seed gives the same patients on every "
                        "scanner. " + "; ".join(f"{s.name}: {s.description}" for s in SCANNERS.values()))
    p.add_argument("--anatomy", default="analytic", choices=list(MRI_ANATOMIES),
                   help="mri only: analytic (a head drawn from shapes, with scalp and skull; default) or mni152 "
                        "(the skull-stripped MNI152 brain, moved per case, as BraTS data are stored; needs the "
                        "nilearn package, whose bundled template it reads)")
    p.add_argument("--lesion-diameter", type=float, nargs=2, metavar=("MIN", "MAX"), default=None,
                   help="petct only: draw lesion diameters log-uniformly between MIN and MAX mm (default 6 45; "
                        "6 <= MIN <= MAX <= 80; lymph nodes stay at 28 mm or less). '6 16' gives phantoms "
                        "of small lesions, the ones near the limit of what PET shows")
    p.add_argument("--workers", type=int, default=1, metavar="W",
                   help="generate cases in W processes (default 1); the files are the same for any W")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing dataset folder (one holding dataset.json, imagesTr, labelsTr, ...)")
    p.set_defaults(func=run)


def run(args) -> int:
    from tqdm import tqdm

    from ..cli import stop_if_terminated
    from ..data.phantom import write_phantom_dataset

    t0 = time.perf_counter()
    with tqdm(total=args.num_cases, desc="phantom", unit="case", disable=None) as bar:
        def progress(done, total):
            bar.update(1)
            stop_if_terminated()

        write_phantom_dataset(
            args.output, args.kind, args.num_cases, seed=args.seed, size=args.size, overwrite=args.overwrite,
            progress=progress, scanner=args.scanner, workers=args.workers, anatomy=args.anatomy,
            lesion_diameter_mm=args.lesion_diameter,
        )
    if args.kind == "petct":
        lesions = args.lesion_diameter
        how = f" (scanner {args.scanner}" + (f", lesions {lesions[0]:g}-{lesions[1]:g} mm)" if lesions else ")")
    else:
        how = f" (anatomy {args.anatomy})" if args.anatomy != "analytic" else ""
    print(f"wrote {args.num_cases} {args.kind} phantom case(s){how} to {args.output} "
          f"({time.perf_counter() - t0:.1f} s)")
    return 0
