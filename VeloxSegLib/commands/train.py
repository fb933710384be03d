"""``veloxseg train``: train a model on an nnU-Net raw dataset and write a bundle."""
from __future__ import annotations

import argparse
import shlex
import sys


def add_run_arguments(p, epochs: int, iterations: int, lr: float, val_every: int) -> None:
    """Options shared by ``train`` and ``finetune``."""
    p.add_argument("-o", "--output", required=True, help="the bundle folder to write (must not exist)")
    p.add_argument("--epochs", type=int, default=epochs, help=f"epochs (default {epochs})")
    p.add_argument("--iterations-per-epoch", type=int, default=iterations,
                   help=f"optimizer steps per epoch (default {iterations})")
    p.add_argument("--batch-size", type=int, help="patches per step and process (default: from the plans for train, 2 for finetune)")
    p.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr:g})")
    p.add_argument("--val-every", type=int, default=val_every,
                   help=f"validate on whole cases every N epochs and at the end (default {val_every})")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="default: auto")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--loader-threads", type=int, metavar="N",
                   help="threads that read the cases and prepare the next patches while the network trains "
                        "(default: 0 on the CPU, up to 8 with a GPU); the patches are the same for any N")
    p.add_argument("--no-sdkt", action="store_true", help="ablation: no Gram (SDKT) distillation loss")
    p.add_argument("--no-reconstruction", action="store_true", help="ablation: no teacher reconstruction loss")
    p.add_argument("--batch-dice", action=argparse.BooleanOptionalAction, default=None,
                   help="Dice over the whole batch instead of per patch (nnU-Net's 3D choice; helps small, "
                        "sparse targets such as PET lesions). Default: off for train, the parent's for finetune")
    p.add_argument("--ds-weights", type=float, nargs="+", metavar="W",
                   help="deep-supervision loss weights, full resolution first (default: equal, as the paper, "
                        "or the parent's for finetune; nnU-Net halves them per scale: 1 0.5 0.25 0.125). "
                        "Missing coarse weights count as 0")
    p.add_argument("--lesion-dice", type=float, metavar="W",
                   help="add W x a lesion-wise Dice term on the main output: 1 - Dice of each connected component "
                        "on its own (other lesions masked out), averaged over the lesions of the batch, so a "
                        "missed 20-voxel lesion costs as much as a missed 2000-voxel one (the 'blob loss' of "
                        "Kofler et al. 2023). Default: 0 (the paper's loss) for train, the parent's for finetune")
    p.add_argument("--dropout", type=float, metavar="P",
                   help="dropout rate of every VeloxSeg block (attention, projections, convolution blocks); default: "
                        "the network's 0.1 for train, the parent's for finetune. Acts only in training: the bundle "
                        "predicts the same for any rate, which is recorded in its model.overrides")
    p.add_argument("--refine-head", type=int, metavar="C",
                   help="add a full-resolution refinement head of C channels (not in the paper): a 3x3x3 convolution "
                        "over the image and the logits whose output is added to the logits, so voxels are decided "
                        "with the image's own detail and not from the quarter grid alone. It starts as the "
                        "identity; 0 removes it. Default: none for train, the parent's for finetune; recorded in "
                        "the bundle's model.overrides")
    p.add_argument("--component-sampling", type=float, default=None, metavar="F",
                   help="fraction of the foreground patches centred on a connected component (lesion) chosen "
                        "uniformly, then a voxel of it, instead of on a random foreground voxel, so that small "
                        "lesions are centred as often as large ones (default: 0, nnU-Net's voxel sampling, for "
                        "train; the parent's for finetune)")
    p.add_argument("--modality-dropout", type=float, default=0.0, metavar="P",
                   help="probability that a training patch has one of its input channels, chosen uniformly, set to "
                        "zeros (the channel's normalized mean), its label kept (ModDrop; not in the paper), so that "
                        "each modality is learned on its own; default 0 (off), for finetune too")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run from its last checkpoint")
    p.add_argument("--work-dir", help="checkpoints, plans, training_log.csv and curves.png "
                                      "(default: OUTPUT.training beside the bundle)")
    store = p.add_mutually_exclusive_group()
    store.add_argument("--preprocessed", metavar="DIR",
                       help="folder of preprocessed training cases, read through memory maps so that a dataset larger "
                            "than memory trains (default: WORK/preprocessed, inside the work folder). Give one folder "
                            "to several runs on the same data (folds, fine-tunes) to preprocess each case once; "
                            "cases of other settings are kept beside each other")
    store.add_argument("--in-memory", action="store_true",
                       help="hold the preprocessed training cases in memory instead (no folder; the same patches)")
    p.add_argument("--compress-preprocessed", action="store_true",
                   help="write the preprocessed cases compressed (chunked, byte-shuffled zlib, lossless: the same "
                        "patches and weights): 2-5 times less disk, each patch read slower (done by the loader "
                        "threads); cases already in the folder are reused as they are stored")
    p.add_argument("--val-dataset", help="validate on every case of this other dataset (all of DATASET trains)")
    p.add_argument("--target-dice", type=float,
                   help="validate every epoch and stop once the validation Dice reaches this value (finetune: "
                        "nothing is trained if the starting weights already reach it)")
    p.add_argument("--final-weights", choices=["best", "last"], default="best",
                   help="weights put in the bundle: best validation Dice (default; for finetune the starting "
                        "weights are validated first and count as a candidate) or the last epoch's")
    p.add_argument("--name", help="bundle name (default: the output folder's name)")
    p.add_argument("--description", help="bundle description")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output bundle / start over")
    p.add_argument("--progress", choices=["bar", "json", "none"], default="bar",
                   help="bar (tqdm on stderr), json (one JSON object per line on stdout) or none")


def register(subparsers):
    p = subparsers.add_parser(
        "train", help="train a model on a dataset (nnU-Net raw format) and write a bundle",
        description=(
            "Plan the dataset (unless --plans is given), then train with the paper's recipe: patches sampled 1:1 "
            "around foreground and background, z-flips and rotations about z, CE + Dice with deep supervision + "
            "0.5 reconstruction + 2.0 Gram (SDKT) loss, AdamW with linear warm-up and cosine decay, AMP on GPUs. "
            "Validation Dice on whole held-out cases every --val-every epochs. Ctrl-C (or SIGTERM) saves a "
            "resumable checkpoint; --resume continues exactly. Run data-parallel with "
            "'torchrun --nproc_per_node=N -m VeloxSegLib.cli train ...'."))
    p.add_argument("dataset", help="nnU-Net raw dataset folder (dataset.json, imagesTr, labelsTr)")
    p.add_argument("--model", help="network preset (default: the plans', veloxseg-b)")
    p.add_argument("--plans", help="plans JSON from 'veloxseg plan' (default: plan now)")
    add_split_arguments(p)
    p.add_argument("--patch-size", type=int, nargs=3, metavar=("X", "Y", "Z"), help="planner override (x y z)")
    p.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"), help="planner override, mm")
    p.add_argument("--configuration", choices=["3d_fullres", "3d_lowres"],
                   help="the plans' configuration to train (default 3d_fullres); 3d_lowres: nnU-Net's coarser one, "
                        "planned when the full-resolution window covers under a quarter of the median image")
    add_run_arguments(p, epochs=300, iterations=250, lr=2.5e-4, val_every=10)
    p.set_defaults(func=run, _parser=p)
    return p


def add_split_arguments(p) -> None:
    """--fold / --split: which cases validate (train and finetune)."""
    split = p.add_mutually_exclusive_group()
    split.add_argument("--fold", type=int, help="5-fold cross-validation fold 0..4 to validate on (the folds' bundles "
                                                "predict together with 'veloxseg predict -m A B ...' or packed by "
                                                "'veloxseg ensemble')")
    split.add_argument("--split", help="train,val,test fractions, e.g. 0.6,0.2,0.2")


def _parse_split(text):
    from ..errors import ConfigError

    if text is None:
        return None
    try:
        parts = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--split expects three fractions like 0.6,0.2,0.2, got {text!r}") from None
    if len(parts) != 3:
        raise ConfigError(f"--split expects three fractions like 0.6,0.2,0.2, got {text!r}")
    return parts


def config_from_args(args, **extra):
    from ..train.trainer import TrainConfig

    return TrainConfig(model=getattr(args, "model_preset", None), epochs=args.epochs,
                       iterations_per_epoch=args.iterations_per_epoch, batch_size=args.batch_size, lr=args.lr,
                       seed=args.seed, val_every=args.val_every, use_sdkt=not args.no_sdkt,
                       use_reconstruction=not args.no_reconstruction, batch_dice=args.batch_dice,
                       ds_weights=tuple(args.ds_weights) if args.ds_weights else None,
                       lesion_dice=args.lesion_dice,
                       device=args.device, threads=args.threads, loader_threads=args.loader_threads,
                       final_weights=args.final_weights, bundle_name=args.name, description=args.description,
                       overwrite=args.overwrite, target_dice=args.target_dice, val_dataset=args.val_dataset,
                       dropout=args.dropout, refine_head=args.refine_head,
                       component_sampling=args.component_sampling, modality_dropout=args.modality_dropout,
                       preprocessed=args.preprocessed,
                       in_memory=args.in_memory, compress_preprocessed=args.compress_preprocessed,
                       configuration=getattr(args, "configuration", None), **extra)


def command_line(args) -> str:
    """The command as typed (``sys.argv``) when it is this process's command line; else rebuilt
    from the parsed options (in-process calls of ``cli.main(argv)``)."""
    argv = sys.argv[1:]
    if args.command in argv:
        return shlex.join(["veloxseg"] + argv)
    parser = getattr(args, "_parser", None)
    words = ["veloxseg", args.command]
    if parser is None:
        return shlex.join(words)
    for action in parser._actions:
        if action.dest in ("help", "func", "_parser"):
            continue
        value = getattr(args, action.dest, None)
        if not action.option_strings:
            words.append(str(value))
        elif value is not None and value != action.default and value is not False:
            words.append(action.option_strings[-1])
            if value is not True:
                words.extend(str(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    return shlex.join(words)


def execute(args, start) -> int:
    """Run ``start(progress, stop)`` with the chosen reporter; report on stderr; exit code."""
    from ..train.progress import make_reporter
    from ..train.trainer import StopRequest

    progress = make_reporter(args.progress)
    try:
        result = start(progress, StopRequest())
    finally:
        progress.close()
        try:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # pragma: no cover
            pass
    if result.bundle is not None:
        dice = result.best_dice
        note = " (measured on the training cases)" if result.validated_on == "training cases" else ""
        print(f"wrote bundle {result.bundle}" + (f"; validation Dice {dice:.4f}{note}" if dice is not None else "")
              + f"; logs and checkpoints in {result.work_dir}", file=sys.stderr)
    return 0


def run(args) -> int:
    from ..train.trainer import run_training

    args.model_preset = args.model
    if args.configuration == "3d_lowres" and (args.spacing or args.patch_size):
        from ..errors import ConfigError

        raise ConfigError("--configuration 3d_lowres takes the planner's low-resolution spacing and window; "
                          "--spacing and --patch-size set a configuration of their own (give one or the other)")
    config = config_from_args(args, fold=args.fold, split=_parse_split(args.split))
    overrides = {"patch_size": args.patch_size, "spacing": args.spacing, "batch_size": args.batch_size}
    if args.model:
        overrides["model"] = args.model
    return execute(args, lambda progress, stop: run_training(
        args.dataset, args.output, config, plans=args.plans, resume=args.resume, work_dir=args.work_dir,
        progress=progress, stop=stop, command=command_line(args), planner_overrides=overrides))
