"""``veloxseg crossval``: the cross-validation result of a model's folds (nnU-Net's
find_best_configuration).

    veloxseg train DATASET -o fold0 --fold 0     (and so on for folds 1-4)
    veloxseg crossval DATASET fold0 fold1 fold2 fold3 fold4 -o cv --pack my-model

Every case of DATASET is segmented by the fold that did not train on it, through the normal
inference pipeline, and scored against its label: per fold and over all cases. The smallest
connected component kept (and, for models that take PET, whether the PET border refinement is
on) is then chosen on those predictions, and --pack writes the folds as one ensemble bundle with
it. With --ensemble, the folds of several configurations trained on the same splits are given
together: the bundles that hold out the same cases are averaged as one model per fold. Writes OUT/predictions/ (the out-of-fold label maps) and
OUT/crossval.json; prints the tables. The bundles and the dataset are only read.
"""
from __future__ import annotations

import argparse
import sys
import time

DESCRIPTION = __doc__.replace("``", "")


def register(subparsers):
    p = subparsers.add_parser("crossval", help="score a cross-validation's folds on their held-out cases; choose "
                                               "the post-processing; pack the folds",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", metavar="DATASET", help="the nnU-Net raw dataset the folds were trained on")
    p.add_argument("bundles", nargs="+", metavar="FOLD_BUNDLE",
                   help="the fold bundles (written by train/finetune --fold K): folders, .zip files or names")
    p.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="folder to write (predictions/ and crossval.json); must not exist unless --overwrite")
    p.add_argument("--regions", nargs="+", metavar="NAME=L,L",
                   help="score unions of labels instead, e.g. ET=3 TC=1,3 WT=1,2,3 (BraTS)")
    p.add_argument("--min-component-candidates", type=float, nargs="+", metavar="MM3",
                   help="smallest-component volumes to try (default: 0 10 25 50 100 250 500 1000, and the folds' "
                        "own)")
    p.add_argument("--ensemble", action="store_true",
                   help="the folds of several configurations trained on the same splits (e.g. fold K of two "
                        "recipes, or of two spacings): bundles holding out the same cases predict them together, "
                        "averaged as predict -m does; the cross-validation of the configurations' ensemble")
    p.add_argument("--pack", metavar="BUNDLE_DIR",
                   help="also write the folds as one ensemble bundle (a folder or .zip) with the chosen "
                        "post-processing")
    p.add_argument("--name", help="with --pack: the ensemble's name (default: the first fold's + '-ensemble')")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"], help="default: cpu")
    p.add_argument("--progress", default="auto", choices=("auto", "bar", "json", "none"),
                   help="auto: a bar on a terminal, else none; json: one JSON line per case on stdout")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier cross-validation folder at -o (and a bundle at --pack)")
    p.set_defaults(func=run)
    return p


class _Reporter:
    def __init__(self, mode: str, start: float):
        self.mode = mode if mode != "auto" else ("bar" if sys.stderr.isatty() else "none")
        self.start = start
        self.bar = None

    def __call__(self, event: dict) -> None:
        if self.mode == "json":
            import json

            print(json.dumps({**event, "elapsed": round(time.perf_counter() - self.start, 3)}), flush=True)
        elif self.mode == "bar":
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=event["total"], desc="crossval", unit="case", file=sys.stderr)
            self.bar.set_postfix_str(f"fold {event['fold']}: {event['case']}")
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(args) -> int:
    import json
    from pathlib import Path

    from ..bundle import check_bundle_output
    from ..errors import ConfigError, InputError
    from ..train.crossval import MIN_GAIN, cross_validate, describe_setting, render_markdown
    from .evaluate import parse_regions
    from .predict import _CancelOnSignal

    start = time.perf_counter()
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    groups = None  # with --ensemble: the bundles' configurations (other spacings, windows or normalizations)
    if args.ensemble:
        from ..bundle import load_bundle
        from ..infer.ensemble import group_configurations
        from ..infer.pipeline import InferencePlan

        loaded = [load_bundle(b) for b in args.bundles]
        groups = [[loaded[i].name for i in g]
                  for g in group_configurations([InferencePlan.from_meta(b.meta) for b in loaded])]
    if args.pack:  # a wrong --pack is refused before the long part
        pack = Path(args.pack).expanduser()
        check_bundle_output(pack, args.overwrite, "pass --overwrite to replace it")
        out = Path(args.output).expanduser().absolute()
        if pack.absolute() == out or out in pack.absolute().parents:
            raise InputError(f"--pack {args.pack}: is the output folder or inside it; write the bundle elsewhere")
        if len(args.bundles) < 2:
            raise ConfigError("--pack needs at least 2 fold bundles")
        if groups and len(groups) > 1:  # averaged on the case's grid, but a bundle holds one configuration
            raise ConfigError(
                f"--pack: the bundles are {len(groups)} configurations (other spacings, windows or normalizations: "
                f"{'; '.join(', '.join(g) for g in groups)}) and a bundle holds one; pack each configuration's "
                f"folds with veloxseg ensemble, or predict with -m and all of them")
    reporter = _Reporter(args.progress, start)
    try:
        with _CancelOnSignal() as cancel:
            summary = cross_validate(args.dataset, args.bundles, args.output, regions=parse_regions(args.regions),
                                     candidates_mm3=args.min_component_candidates, device=args.device,
                                     threads=args.threads, overwrite=args.overwrite, progress=reporter,
                                     cancel=cancel, ensemble=args.ensemble)
    finally:
        reporter.close()
    pp = summary["postprocessing"]
    packed = None
    if args.pack:
        from ..infer.ensemble import pack_ensemble
        from .train import command_line

        packed = pack_ensemble(args.bundles, args.pack, name=args.name, overwrite=args.overwrite,
                               command=command_line(args), inference=pp["inference"])
    if args.progress == "json":
        print(json.dumps({"stage": "done", "output": str(args.output), "mean": {
            k: v["dice"] for k, v in summary["mean"].items()}, "postprocessing": pp["best"],
            "packed": str(packed) if packed else None, "elapsed": round(time.perf_counter() - start, 3)}), flush=True)
        return 0
    print(render_markdown(summary))
    print()
    if pp["best"] == pp["current"]:
        print(f"Post-processing: the folds' own ({describe_setting(pp['current'])}) is kept: nothing else gains over "
              f"{MIN_GAIN} mean Dice.")
    else:
        print(f"Post-processing: {describe_setting(pp['best'])} (the folds': {describe_setting(pp['current'])}; "
              f"+{pp['gain']:.4f} mean Dice).")
    if packed:
        print(f"Wrote {packed}: the {len(args.bundles)} fold bundles as one ensemble, {describe_setting(pp['best'])}.")
    elif len(args.bundles) > 1:
        extra = ""
        if pp["best"]["min_component_mm3"] != pp["current"]["min_component_mm3"]:
            extra += f" --min-component-mm3 {pp['best']['min_component_mm3']:g}"
        hint = (" (then predict with --pet-refine / --no-pet-refine as chosen, or use --pack, which records it)"
                if pp["best"]["pet_refine"] != pp["current"]["pet_refine"] else "")
        if groups and len(groups) > 1:  # not packable: the chosen setting goes on the command line
            if pp["best"]["pet_refine"] != pp["current"]["pet_refine"]:
                extra += " --pet-refine" if pp["best"]["pet_refine"] else " --no-pet-refine"
            print(f"To predict with the {len(groups)} configurations together (a bundle holds one): veloxseg "
                  f"predict -m {' '.join(args.bundles)} -i ...{extra}")
        else:
            print(f"To predict with the folds as one model: veloxseg ensemble {' '.join(args.bundles)} -o NAME"
                  f"{extra}{hint}")
    print(f"Wrote {args.output} in {time.perf_counter() - start:.0f} s.", file=sys.stderr)
    return 0
