"""Test child: prints JSON progress lines and log lines, optionally spawns a sleeping grandchild.

usage: progress_child.py MODE [PIDFILE]
  MODE "ok": a few progress lines, a non-UTF-8 log line, exit 0
  MODE "fail": progress then a one-line error on stderr, exit 3
  MODE "hang": spawn a grandchild (writes both PIDs to PIDFILE), print progress, sleep forever
"""
import json
import os
import subprocess
import sys
import time

mode = sys.argv[1]
out = sys.stdout
for i in range(3):
    out.write(json.dumps({"stage": "sliding_window", "fraction": (i + 1) / 4, "elapsed": 0.1 * i}) + "\n")
    out.flush()
sys.stdout.buffer.write(b"log line with bad bytes \xff\xfe and \xc3\xa9\n")
sys.stdout.buffer.flush()
if mode == "ok":
    out.write(json.dumps({"stage": "done", "fraction": 1.0, "elapsed": 0.3}) + "\n")
    sys.exit(0)
if mode == "fail":
    sys.stderr.write("Traceback-free noise\n")
    sys.stderr.write("veloxseg predict: error: input image is empty\n")
    sys.exit(3)
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
with open(sys.argv[2], "w") as f:
    f.write(f"{os.getpid()} {grandchild.pid}\n")
out.write(json.dumps({"stage": "waiting", "fraction": 0.5}) + "\n")
out.flush()
time.sleep(600)
