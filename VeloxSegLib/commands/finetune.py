"""``veloxseg finetune``: adapt a bundle to local cases and write a new bundle."""
from __future__ import annotations

from .train import _parse_split, add_run_arguments, add_split_arguments, command_line, config_from_args, execute


def register(subparsers):
    from ..train.defaults import FINETUNE_EPOCHS, FINETUNE_ITERATIONS, FINETUNE_LR

    p = subparsers.add_parser(
        "finetune", help="fine-tune a bundle on local cases (nnU-Net raw format) into a new bundle",
        description=(
            "Start from a bundle's weights and train on local cases with the bundle's spacing, patch size (unless "
            "--patch-size changes it) and normalization. A dataset with other labels than the bundle re-initializes "
            "only the segmentation heads. Works with as few as 2 cases (then validation uses the training cases, and says so). The "
            "new bundle's training record names its parent; the source bundle is never modified."))
    p.add_argument("-m", "--model", required=True, help="source bundle: folder, .zip or installed name")
    p.add_argument("dataset", help="nnU-Net raw dataset folder (dataset.json, imagesTr, labelsTr)")
    p.add_argument("--freeze-encoder", action="store_true", help="train only decoder, heads (and teachers)")
    p.add_argument("--fresh-warmup", type=int, default=0, metavar="STEPS",
                   help="train only the modules that start afresh (texture teachers, deep-supervision heads, the "
                        "heads of a new label set) for the first STEPS steps, holding the bundle's weights, which "
                        "then join with their own warm-up (default 0: everything trains from the first step)")
    p.add_argument("--patch-size", type=int, nargs=3, metavar=("X", "Y", "Z"),
                   help="train (and predict) at this patch size instead of the bundle's; the attention windows "
                        "follow it, and each position-bias table keeps the bias of every offset both windows share")
    p.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"),
                   help="train (and predict) at this voxel spacing in mm instead of the bundle's; every weight is "
                        "kept, and the patch covers a field of view that much smaller or larger")
    add_split_arguments(p)
    add_run_arguments(p, epochs=FINETUNE_EPOCHS, iterations=FINETUNE_ITERATIONS, lr=FINETUNE_LR, val_every=1)
    p.set_defaults(func=run, _parser=p)
    return p


def run(args) -> int:
    from ..train.finetune import run_finetune

    args.model_preset = None
    config = config_from_args(args, freeze_encoder=args.freeze_encoder, fresh_warmup=args.fresh_warmup,
                              fold=args.fold, split=_parse_split(args.split))
    return execute(args, lambda progress, stop: run_finetune(
        args.model, args.dataset, args.output, config,
        patch_size=tuple(reversed(args.patch_size)) if args.patch_size else None, spacing=args.spacing,
        resume=args.resume,
        work_dir=args.work_dir, progress=progress, stop=stop, command=command_line(args)))
