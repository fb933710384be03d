"""Stand-in for ``veloxseg predict`` with the same arguments and JSON-line progress.

Labels 1 where the last input is above 50 (a hot PET lesion), written on the first input's grid.
Lets the Slicer-side flow (inputs out, progress, import) be tested without a trained model.
"""
import argparse
import json
import os
import sys
import time

import SimpleITK as sitk

parser = argparse.ArgumentParser()
parser.add_argument("-m", "--model", required=True)
parser.add_argument("-i", "--input", nargs="+", required=True)
parser.add_argument("-o", "--output", required=True)
parser.add_argument("--device", default="auto")
parser.add_argument("--overlap", type=float)
parser.add_argument("--tta", action="store_true")
parser.add_argument("--progress")
parser.add_argument("--overwrite", action="store_true")
args = parser.parse_args()
images = [sitk.ReadImage(p) for p in args.input]
for other in images[1:]:
    if other.GetSize() != images[0].GetSize():
        print("veloxseg predict: error: inputs are not on one grid", file=sys.stderr)
        sys.exit(2)
for i in range(4):
    print(json.dumps({"stage": "sliding_window", "fraction": i / 4, "elapsed": 0.01 * i}), flush=True)
    if os.environ.get("FAKE_PREDICT_HANG"):  # a long run, for cancel and shutdown tests
        time.sleep(600)
label = sitk.Cast(images[-1] > 50, sitk.sitkUInt8)
label.CopyInformation(images[0])
sitk.WriteImage(label, args.output)
print(json.dumps({"stage": "done", "fraction": 1.0, "elapsed": 0.05}), flush=True)
