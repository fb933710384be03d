"""``veloxseg bench``: speed and memory benchmarks (writes docs/benchmarks.md)."""
from __future__ import annotations

import json
import sys


def register(subparsers):
    p = subparsers.add_parser("bench", help="benchmark the networks (and pipelines) on this machine",
                              description="Measure parameters, GMAC, CPU patches/s at 1 and 2 threads and "
                                          "peak memory for every VeloxSeg preset, LightMedSeg and MONAI peers "
                                          "(UNet, SegResNet, SwinUNETR) in the same run.")
    p.add_argument("--models", nargs="+", help="subset of models (default: all)")
    p.add_argument("--reps", type=int, default=24,
                   help="timed repetitions per model and thread count (a quarter for SegResNet and SwinUNETR)")
    p.add_argument("--output", "-o", help="write a markdown table here (and the raw figures as .json)")
    p.add_argument("--json", action="store_true", help="print the raw figures as JSON on stdout")
    p.add_argument("--sections", nargs="+", choices=["patch", "wholebody", "training", "store", "finetune"],
                   help="which benchmarks to run (default: all available)")
    p.add_argument("--reference", metavar="DIR",
                   help="also time the authors' implementation from this checkout of "
                        "github.com/JinPLu/VeloxSeg (runs that repository's code; not downloaded by us) "
                        "and report every model's speed against it")
    p.add_argument("--render-only", action="store_true",
                   help="measure nothing: rebuild the --output page from the figures an earlier run saved next "
                        "to it (.json) and the saved comparisons (training-comparison*.json), e.g. after a new "
                        "'veloxseg compare'")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..bench import MODELS, render_markdown, run as run_bench

    if args.render_only:
        from ..bench import render_saved
        from ..errors import ConfigError

        if not args.output:
            raise ConfigError("--render-only needs --output, the page to rebuild (e.g. docs/benchmarks.md)")
        render_saved(args.output)
        print(f"rebuilt {args.output} from its saved figures", file=sys.stderr)
        return 0

    unknown = [m for m in (args.models or []) if m not in MODELS]
    if unknown:
        from ..errors import ConfigError

        raise ConfigError(f"unknown benchmark model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    result = run_bench(models=args.models, reps=args.reps, output=args.output, sections=args.sections,
                       reference=args.reference)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(render_markdown(result))
    return 0
