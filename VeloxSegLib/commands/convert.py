"""``veloxseg convert``: build an nnU-Net raw dataset from folders with per-channel glob patterns."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="build an nnU-Net raw dataset from image folders (per-channel glob patterns)",
        description=(
            "Collect each case's channels and label with glob patterns, check that they are complete, "
            "share a physical space and that labels lie on the first channel's grid, and write an nnU-Net "
            "v2 raw dataset. Refused cases are named; nothing is written unless every case passes. "
            "Examples for AutoPET-II, Hecktor 2022 and BraTS 2021 are in docs/datasets.md."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "example:\n"
            "  veloxseg convert --images-dir raw --channel CT='*_CT.nii.gz' --channel PET='*_SUV.nii.gz' \\\n"
            "      --labels '*_SEG.nii.gz' --labels-map background=0,lesion=1 -o Dataset001_PETCT"
        ),
    )
    p.add_argument("--images-dir", required=True, metavar="DIR", help="folder the channel patterns are relative to")
    p.add_argument("--channel", action="append", required=True, metavar="NAME=GLOB",
                   help="a channel and its glob pattern; repeat in channel order (the first is the reference grid)")
    p.add_argument("--labels", required=True, metavar="GLOB", help="glob pattern of the label files")
    p.add_argument("--labels-dir", metavar="DIR",
                   help="folder the labels pattern is relative to (default --images-dir)")
    p.add_argument("--case-regex", metavar="REGEX",
                   help="regular expression applied to each file's path relative to its folder; its 'case' group "
                        "(or first group, or whole match) is the case identifier (default: the text the pattern's "
                        "* wildcards matched)")
    p.add_argument("--labels-map", metavar="NAME=VALUE,...",
                   help="output label names and values, consecutive from 0, e.g. background=0,lesion=1 "
                        "(default: label_<v> for the values found)")
    p.add_argument("--remap", metavar="FROM=TO,...", help="map input label values first, e.g. 4=3 for BraTS")
    p.add_argument("--align", action="store_true",
                   help="resample every channel onto the first channel's grid (otherwise they must share it)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="dataset folder to create")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing dataset folder (one holding dataset.json, imagesTr, labelsTr, ...)")
    p.set_defaults(func=run)


def run(args) -> int:
    from tqdm import tqdm

    from ..cli import stop_if_terminated
    from ..data.convert import convert_dataset, parse_channel_spec, parse_labels_map, parse_remap

    channels = [parse_channel_spec(s) for s in args.channel]
    labels_map = parse_labels_map(args.labels_map) if args.labels_map else None
    remap = parse_remap(args.remap) if args.remap else None
    with tqdm(desc="convert", unit="case", disable=None) as bar:
        def progress(done, total):
            bar.total = total
            bar.update(1)
            stop_if_terminated()

        data = convert_dataset(
            args.images_dir, channels, args.labels, args.output, labels_dir=args.labels_dir,
            case_regex=args.case_regex, labels_map=labels_map, remap=remap, align=args.align,
            overwrite=args.overwrite, progress=progress,
        )
    print(f"wrote {data['numTraining']} case(s) with channels {', '.join(data['channel_names'].values())} "
          f"and labels {', '.join(data['labels'])} to {args.output}")
    return 0
