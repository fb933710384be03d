"""Stand-in for ``veloxseg finetune``: checks the dataset, prints epoch records, writes a bundle.

usage: fake_finetune.py -m BUNDLE DATASET -o NEW_BUNDLE [--epochs E] [--lr X] --progress json [--hang]
"""
import argparse
import json
import os
import shutil
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("-m", "--model", required=True)
parser.add_argument("dataset")
parser.add_argument("-o", "--output", required=True)
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--lr", type=float, default=1e-4)
parser.add_argument("--progress")
parser.add_argument("--device")
parser.add_argument("--work-dir")
parser.add_argument("--hang", action="store_true")
args = parser.parse_args()
with open(os.path.join(args.dataset, "dataset.json")) as f:
    dataset = json.load(f)
if dataset["numTraining"] < 1:
    print("veloxseg finetune: error: empty dataset", file=sys.stderr)
    sys.exit(2)
os.makedirs(args.output)
if args.work_dir:  # where the real command keeps its checkpoints
    os.makedirs(args.work_dir)
    with open(os.path.join(args.work_dir, "last.safetensors"), "wb") as f:
        f.write(b"checkpoint")
for epoch in range(args.epochs):
    print(json.dumps({"epoch": epoch, "loss": {"total": 1.0 / (epoch + 1), "dice_ce": 0.8 / (epoch + 1)},
                      "lr": args.lr, "val_dice": 0.5 + 0.1 * epoch, "seconds": 0.01}), flush=True)
    if args.hang:
        time.sleep(600)
with open(os.path.join(args.model, "bundle.json")) as f:
    meta = json.load(f)
meta["name"] = os.path.basename(args.output)
meta["training"]["parent"] = os.path.basename(args.model)
with open(os.path.join(args.output, "bundle.json"), "w") as f:
    json.dump(meta, f)
shutil.copy(os.path.join(args.model, "model.safetensors"), os.path.join(args.output, "model.safetensors"))
