"""Data-parallel training: two CPU processes (gloo) end with identical weights; rank 0 writes."""
import os
import socket
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

WORKER = textwrap.dedent("""
    import hashlib, os, sys
    import torch
    torch.set_num_threads(1)
    from VeloxSegLib.train import trainer
    from VeloxSegLib.train.trainer import TrainConfig, run_training

    dataset, output, out_dir = sys.argv[1:4]
    preprocess = trainer.preprocess_case

    def logged(ds, case, setup):  # which rank preprocesses which case
        with open(os.path.join(out_dir, "pre" + os.environ["RANK"] + ".txt"), "a") as fh:
            fh.write(case + "\\n")
        return preprocess(ds, case, setup)

    trainer.preprocess_case = logged
    config = TrainConfig(epochs=1, iterations_per_epoch=2, batch_size=1, val_every=5, device="cpu")
    result = run_training(dataset, output, config, command="test_ddp")
    h = hashlib.sha256()
    for key, value in sorted(result.model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    rank = os.environ["RANK"]
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as fh:
        fh.write(h.hexdigest() + " " + str(result.bundle))
""")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_two_cpu_ranks_end_with_identical_weights_and_rank0_writes_the_bundle(tmp_path):
    from VeloxSegLib.data.phantom import write_phantom_dataset

    ds = tmp_path / "ds"
    write_phantom_dataset(ds, "petct", 3, seed=2, size=(64, 64, 48))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "bundle"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}", str(script), str(ds), str(out),
           str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    h0, b0 = (tmp_path / "rank0.txt").read_text().split(" ")
    h1, b1 = (tmp_path / "rank1.txt").read_text().split(" ")
    assert h0 == h1
    assert b0 == str(out) and b1 == "None"  # only rank 0 writes the bundle
    assert sorted(os.listdir(out)) == ["bundle.json", "model.safetensors"]
    from VeloxSegLib.train.checkpoint import read_checkpoint

    ckpt = read_checkpoint(tmp_path / "bundle.training" / "checkpoints" / "last.safetensors")
    assert ckpt.state["run"]["world_size"] == 2 and len(ckpt.state["ranks"]) == 2
    assert ckpt.state["ranks"][0]["sampler"] != ckpt.state["ranks"][1]["sampler"]
    # the ranks share the work of preprocessing (each case once, into one memory-mapped folder)
    pre = [set((tmp_path / f"pre{r}.txt").read_text().split()) if (tmp_path / f"pre{r}.txt").exists() else set()
           for r in (0, 1)]
    train = set(ckpt.state["splits"]["train"])
    assert len(train) == 2 and pre[0] | pre[1] == train and len(pre[0]) == len(pre[1]) == 1
    store = tmp_path / "bundle.training" / "preprocessed"
    assert len(list(store.glob("*.json"))) == 2 and not [p for p in store.iterdir() if p.name.startswith(".")]


DISK_WORKER = textwrap.dedent("""
    import contextlib, io, os, shutil, sys
    from collections import namedtuple
    import torch
    torch.set_num_threads(1)
    from VeloxSegLib.cli import main

    dataset, output, out_dir, free = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    usage = namedtuple("usage", "total used free")
    shutil.disk_usage = lambda path: usage(10 ** 12, 10 ** 12 - free, free)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):  # the real command: its message, exit code and shutdown
        rc = main(["train", dataset, "-o", output, "--epochs", "1", "--iterations-per-epoch", "1", "--batch-size",
                   "1", "--device", "cpu", "--progress", "none"])
    with open(os.path.join(out_dir, "said" + os.environ["RANK"] + ".txt"), "w") as fh:
        fh.write(str(rc) + " " + err.getvalue())
""")


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_the_disk_check_counts_every_rank_s_share(tmp_path):
    """Each rank preprocesses its share onto the same disk: room for one rank's share but not
    for both is refused on both ranks, before any case is written."""
    from VeloxSegLib.data.nnunet import load_dataset
    from VeloxSegLib.data.phantom import write_phantom_dataset
    from VeloxSegLib.train.cache import estimate_bytes
    from VeloxSegLib.train.trainer import RunSetup, TrainConfig, resolve_plans

    ds = tmp_path / "ds"
    write_phantom_dataset(ds, "petct", 3, seed=2, size=(64, 64, 48))
    setup = RunSetup.from_plans(resolve_plans(ds), TrainConfig())
    one = estimate_bytes(load_dataset(ds), [load_dataset(ds).cases[0]], setup)
    script = tmp_path / "worker.py"
    script.write_text(DISK_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}", str(script), str(ds),
           str(tmp_path / "bundle"), str(tmp_path), str(int(one * 1.5))]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        rc, said = (tmp_path / f"said{rank}.txt").read_text().split(" ", 1)
        assert rc == "2" and "need about" in said and "--in-memory" in said, said
    assert not (tmp_path / "bundle").exists() and not (tmp_path / "bundle.training").exists()
