"""``veloxseg plan``: fingerprint an nnU-Net raw dataset and write training plans (JSON)."""
from __future__ import annotations

from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan",
        help="fingerprint a dataset and write training plans (spacing, patch, normalization, batch)",
        description=(
            "Measure an nnU-Net raw dataset (spacings, sizes, per-channel intensities over the foreground "
            "and the body, label volumes) and choose the target spacing, patch size, per-channel "
            "normalization and batch size. Every choice can be overridden; overrides are recorded in the "
            "plans. See docs/datasets.md."
        ),
    )
    p.add_argument("dataset", metavar="DATASET", help="nnU-Net raw dataset folder (with dataset.json)")
    p.add_argument("-o", "--output", metavar="FILE", help="plans file to write (default DATASET/plans.json)")
    p.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"), help="target spacing in mm")
    p.add_argument("--patch-size", type=int, nargs=3, metavar=("X", "Y", "Z"),
                   help="patch size in voxels (each a multiple of 32)")
    p.add_argument("--batch-size", type=int, metavar="N", help="patches per batch")
    p.add_argument("--normalization", action="append", default=[], metavar="CH=SCHEME",
                   help="channel (name or index) normalization: ct, pet_zscore_body, pet_suv, zscore_nonzero or "
                        "none, with optional :key=value parameters (e.g. CT=ct:clip=-1000,600:mean=40:std=200, "
                        "PET=pet_suv:suv_factor=1) or a JSON object; repeatable")
    p.add_argument("--model", default="veloxseg-b", help="network preset (default veloxseg-b)")
    p.add_argument("--in-channels", type=int, nargs="+", metavar="N",
                   help="channels per modality stream, e.g. 1 1 (separate) or 4 (early fusion)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="cases read and measured at once (default: the CPUs, at most 4; each holds one case in "
                        "memory)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing plans file")
    p.add_argument("--max-patch-voxels", type=int, metavar="N",
                   help=f"memory budget for automatic patch sizes (default 96^3 = {96 ** 3})")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import ConfigError, InputError
    from ..train.planner import default_fingerprint_threads, parse_normalization, plan_dataset

    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")

    normalization = dict(parse_normalization(s) for s in args.normalization)
    from ..data.io import check_output_file

    if not Path(args.dataset).is_dir():  # before the output, which defaults to a file inside it
        raise InputError(f"{args.dataset}: not a directory")
    output = Path(args.output) if args.output else Path(args.dataset) / "plans.json"
    # before any work; never onto the dataset's own files (its dataset.json, its images)
    check_output_file(output, overwrite=args.overwrite, inputs=[args.dataset], what="a plans file")
    from tqdm import tqdm

    from ..cli import stop_if_terminated

    with tqdm(desc="plan", unit="case", disable=None) as bar:  # every case is read: long on a large dataset
        def progress(done, total):
            bar.total = total
            bar.n = done
            bar.refresh()
            stop_if_terminated()

        plans = plan_dataset(
            args.dataset, output, progress=progress, threads=args.threads or default_fingerprint_threads(),
            spacing=args.spacing, patch_size=args.patch_size,
            batch_size=args.batch_size, normalization=normalization or None, model=args.model,
            in_channels=args.in_channels, max_patch_voxels=args.max_patch_voxels,
        )
    fp = plans["fingerprint"]
    print(f"dataset: {fp['name']} ({fp['num_cases']} cases, channels {', '.join(c['name'] for c in fp['channels'])})")
    print(f"spacing: {plans['spacing']}  patch size: {plans['model']['patch_size']}  batch size: {plans['batch_size']}")
    low = plans["configurations"].get("3d_lowres")
    if low:
        print(f"3d_lowres (train --configuration 3d_lowres): spacing: {low['spacing']}  patch size: "
              f"{low['patch_size']}  batch size: {low['batch_size']}")
    else:
        print(f"3d_lowres: {plans['decisions']['3d_lowres']}")
    for ch in plans["channels"]:
        print(f"normalization {ch['name']}: {ch['normalization']}")
    if plans["overrides"]:
        print(f"overrides: {plans['overrides']}")
    print(f"wrote {output}")
    return 0
