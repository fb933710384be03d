"""``veloxseg visibility``: how visible each lesion of a PET/CT phantom dataset is (d' in PET and CT)."""
from __future__ import annotations

import math
import sys
import time


def register(subparsers) -> None:
    from ..data.visibility import DEFAULT_DRAWS

    p = subparsers.add_parser(
        "visibility",
        help="score how visible each lesion of a PET/CT phantom dataset is (detectability d' in PET and CT)",
        description=(
            "For each lesion (26-connected component of the label, as `veloxseg evaluate --lesions` counts them) "
            "of a dataset written by `veloxseg phantom --kind petct`, the detectability index d' of an observer "
            "who knows the lesion and the background (non-prewhitening matched filter), in PET and in CT, "
            "against the scanner's noise and the anatomy's texture; d' >= 5 (Rose) is a lesion an observer can "
            "find. The cases are rebuilt from the dataset's seed, size and scanner, and each label is checked "
            "against its file. Writes JSON for `veloxseg evaluate --visibility` and prints a summary. "
            "See docs/metrics.md."
        ),
    )
    p.add_argument("dataset", help="a PET/CT phantom dataset folder (dataset.json, labelsTr)")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="JSON file to write")
    p.add_argument("--draws", type=int, default=DEFAULT_DRAWS, metavar="N",
                   help=f"texture draws for the anatomy's clutter (default {DEFAULT_DRAWS})")
    p.add_argument("--workers", type=int, default=1, metavar="W",
                   help="score cases in W processes (default 1); the figures are the same for any W")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=run)


def format_summary(data: dict) -> str:
    """Lesions per PET d' bin, with how many of them CT shows (d' >= the Rose criterion)."""
    from ..data.visibility import DPRIME_EDGES
    from .evaluate import bin_span

    rose = data["rose_dprime"]
    bounds = [0.0] + list(DPRIME_EDGES) + [math.inf]
    lesions = [e for les in data["cases"].values() for e in les]
    rows = [("PET d'", "lesions", f"CT d' >= {rose:g}", "median voxels")]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        inside = [e for e in lesions if lo <= e["pet_dprime"] < hi]
        span = bin_span(lo, hi)
        sizes = sorted(e["voxels"] for e in inside)
        median = f"{(sizes[(len(sizes) - 1) // 2] + sizes[len(sizes) // 2]) / 2:g}" if sizes else "-"
        rows.append((span, str(len(inside)), str(sum(1 for e in inside if e["ct_dprime"] >= rose)), median))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"{len(lesions)} lesions in {len(data['cases'])} cases (scanner {data['scanner']}, seed {data['seed']})"]
    lines += ["  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]) for r in rows]
    return "\n".join(lines)


def run(args) -> int:
    from tqdm import tqdm

    from ..cli import stop_if_terminated
    from ..data.io import check_output_file
    from ..data.visibility import dataset_visibility
    from ..errors import ConfigError
    from .. import metrics as M
    from .evaluate import write_json_atomic

    if args.draws < 1:
        raise ConfigError(f"--draws must be at least 1, got {args.draws}")
    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    out = check_output_file(args.output, overwrite=args.overwrite, inputs=[args.dataset])
    t0 = time.perf_counter()
    with tqdm(desc="visibility", unit="case", disable=None) as bar:
        def progress(done, total):
            bar.total = total
            bar.update(1)
            stop_if_terminated()

        data = dataset_visibility(args.dataset, draws=args.draws, progress=progress, workers=args.workers)
    write_json_atomic(M.json_safe(data), out)
    print(format_summary(data))
    print(f"wrote {out} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0

