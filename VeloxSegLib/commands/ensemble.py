"""``veloxseg ensemble``: pack several bundles (the folds of a cross-validation) into one bundle.

    veloxseg ensemble fold0-model fold1-model fold2-model fold3-model fold4-model -o my-ensemble

The new bundle holds every member's network; predicting with it averages their logits in every
window, exactly as ``veloxseg predict -m fold0-model fold1-model ...`` does, and it goes wherever
a bundle goes (``-m NAME``, the user models folder, the Slicer panel, a ``.zip``). The members
must take the same inputs at the same spacing, give the same labels and hold the same network;
they are only read.
"""
from __future__ import annotations

import argparse

DESCRIPTION = __doc__.replace("``", "")


def register(subparsers):
    p = subparsers.add_parser("ensemble", help="pack several bundles (cross-validation folds) into one bundle",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundles", nargs="+", metavar="BUNDLE", help="bundle folders, .zip files or names (2 or more)")
    p.add_argument("-o", "--output", required=True, metavar="BUNDLE_DIR",
                   help="the ensemble bundle to write (a folder, or a .zip)")
    p.add_argument("--name", help="the bundle's name (default: the first member's name + '-ensemble')")
    p.add_argument("--description", help="the bundle's description (default: names its members)")
    p.add_argument("--min-component-mm3", type=float, metavar="V",
                   help="the ensemble's smallest component kept (default: the first member's; veloxseg crossval "
                        "chooses one)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle at the output")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    import math

    from ..errors import ConfigError
    from ..infer.ensemble import pack_ensemble
    from .train import command_line

    inference = None
    if args.min_component_mm3 is not None:
        if not (math.isfinite(args.min_component_mm3) and args.min_component_mm3 >= 0):
            raise ConfigError(f"--min-component-mm3 must be a volume >= 0, got {args.min_component_mm3}")
        inference = {"min_component_mm3": args.min_component_mm3}
    out = pack_ensemble(args.bundles, args.output, name=args.name, description=args.description,
                        overwrite=args.overwrite, command=command_line(args), inference=inference)
    print(f"wrote {out}: an ensemble of {len(args.bundles)} networks")
    return 0
