"""Progress reporting of training runs: a tqdm bar, JSON lines, a CSV log and a curve plot.

Reporters receive plain dict records (every one has an ``event``):

- ``prepare`` (before ``start``, as the run reads its data): ``stage`` ("plan": the planner
  measures each case; "preprocess": the training cases are preprocessed into the folder of
  preprocessed cases, or into memory), ``done``, ``total`` (cases), ``seconds``. Cases reused from
  the folder are not counted, so a run with nothing to prepare emits none;
- ``start``: ``epochs``, ``iterations_per_epoch``, ``train_cases``, ``val_cases``, ``validation``
  (``"held-out"`` or ``"training cases"``), ``start_epoch``;
- ``step`` (a summary every few steps): ``stage`` ("train"), ``step``/``steps`` (global
  optimizer steps), ``iteration``/``iterations`` (inside the epoch), ``epoch_in_progress``,
  ``fraction``, ``loss`` (parts of the last step), ``lr``, ``seconds`` (since the epoch began).
  Step records deliberately carry no ``epoch`` key: consumers take records with ``epoch`` as
  finished epochs;
- ``epoch``: ``epoch`` (0-based), ``epochs``, ``loss`` (epoch means of ``seg``, ``rc``, ``sdkt``,
  ``total``), ``lr``, ``val_dice`` (mean foreground Dice, or null when not validated this
  epoch), ``val_dice_per_label``, ``best``, ``seconds``;
- ``start_validation`` (fine-tuning, before the first step): ``val_dice`` and
  ``val_dice_per_label`` of the starting (parent's) weights, ``seconds``;
- ``message``: ``message`` (e.g. "validating on the training cases");
- ``done``: ``bundle``, ``val_dice``, ``seconds``.

``--progress json`` prints exactly one JSON object per line on stdout and nothing else there;
everything for people goes to stderr.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

log = logging.getLogger(__name__)

LOSS_PARTS = ("seg", "rc", "sdkt", "total")
PREPARE_TEXT = {"plan": "planning", "preprocess": "preprocessing"}
CSV_COLUMNS = ("epoch", "loss_total", "loss_seg", "loss_rc", "loss_sdkt", "lr", "val_dice", "seconds")


def _clean(value):
    """JSON-safe: NaN/inf become null (strict JSON parsers refuse them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class ProgressReporter:
    """Base reporter: ignores everything (used on ranks other than 0)."""

    def emit(self, record: Dict) -> None:
        pass

    def close(self) -> None:
        pass


class JsonLinesProgress(ProgressReporter):
    """One JSON object per line on ``stream`` (stdout by default), flushed at once."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout

    def emit(self, record: Dict) -> None:
        self.stream.write(json.dumps(_clean(record), allow_nan=False) + "\n")
        self.stream.flush()


class TqdmProgress(ProgressReporter):
    """A tqdm bar over all optimizer steps on stderr, epoch summaries written above it."""

    def __init__(self, stream=None, disable: Optional[bool] = None):
        self.stream = stream or sys.stderr
        self.disable = disable
        self.bar = None
        self.stage = None  # the preparation stage the bar shows (None: the training bar or none)

    def emit(self, record: Dict) -> None:
        from tqdm.auto import tqdm

        event = record.get("event")
        if event == "prepare":
            if self.bar is None or self.stage != record["stage"]:
                self.close()
                self.stage = record["stage"]
                self.bar = tqdm(total=record["total"], file=self.stream, unit="case", dynamic_ncols=True,
                                disable=self.disable, desc=PREPARE_TEXT.get(record["stage"], record["stage"]))
            self.bar.n = record["done"]
            self.bar.refresh()
            return
        if event == "start":
            self.close()  # a preparation bar
            total = record["epochs"] * record["iterations_per_epoch"]
            done = record.get("start_step", 0)
            self.bar = tqdm(total=total, initial=done, file=self.stream, unit="it", dynamic_ncols=True,
                            disable=self.disable, desc="training")
        elif event == "step" and self.bar is not None:
            self.bar.n = record["step"]
            self.bar.set_postfix(loss=f"{record['loss'].get('total', float('nan')):.4f}", lr=f"{record['lr']:.2e}",
                                 refresh=False)
            self.bar.refresh()
        elif event == "epoch":
            dice = record.get("val_dice")
            text = (f"epoch {record['epoch'] + 1}/{record['epochs']}: loss {record['loss'].get('total', 0):.4f} "
                    f"lr {record['lr']:.2e}" + (f" val Dice {dice:.4f}{' (best)' if record.get('best') else ''}"
                                                if dice is not None else "") + f" ({record['seconds']:.1f} s)")
            if self.bar is not None:
                self.bar.write(text, file=self.stream)
            else:
                print(text, file=self.stream)
        elif event == "start_validation":
            text = f"starting weights: val Dice {record['val_dice']:.4f} ({record['seconds']:.1f} s)"
            (self.bar.write if self.bar is not None else print)(text, file=self.stream)
        elif event == "message":
            (self.bar.write if self.bar is not None else print)(record["message"], file=self.stream)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.stage = None


class MultiProgress(ProgressReporter):
    def __init__(self, reporters: Sequence[ProgressReporter]):
        self.reporters = list(reporters)

    def emit(self, record: Dict) -> None:
        for r in self.reporters:
            try:
                r.emit(record)
            except Exception:  # a reporting error must never kill a training run
                log.exception("progress reporter %s failed", type(r).__name__)

    def close(self) -> None:
        for r in self.reporters:
            r.close()


class CallbackProgress(ProgressReporter):
    """Calls ``fn(record)`` (API users, tests)."""

    def __init__(self, fn):
        self.fn = fn

    def emit(self, record: Dict) -> None:
        self.fn(record)


def make_reporter(kind: str = "bar", callback=None) -> ProgressReporter:
    """``bar`` (tqdm on stderr), ``json`` (JSON lines on stdout) or ``none``."""
    reps: List[ProgressReporter] = []
    if kind == "json":
        reps.append(JsonLinesProgress())
    elif kind == "bar":
        reps.append(TqdmProgress())
    elif kind != "none":
        raise ValueError(f"unknown progress kind {kind!r}")
    if callback is not None:
        reps.append(CallbackProgress(callback))
    return MultiProgress(reps)


# --------------------------------------------------------------------------- log files


def epoch_row(record: Dict) -> Dict:
    loss = record.get("loss", {})
    return {"epoch": record["epoch"], "loss_total": loss.get("total"), "loss_seg": loss.get("seg"),
            "loss_rc": loss.get("rc"), "loss_sdkt": loss.get("sdkt"), "loss_lesion": loss.get("lesion"),
            "lr": record.get("lr"), "val_dice": record.get("val_dice"), "seconds": record.get("seconds")}


def write_csv_log(path, history: Sequence[Dict]) -> Path:
    """``training_log.csv``: one row per epoch (empty cells where a value is absent). Runs with
    the lesion-wise Dice term (``--lesion-dice``) get a ``loss_lesion`` column after ``loss_sdkt``."""
    path = Path(path)
    columns = CSV_COLUMNS
    if any(rec.get("loss", {}).get("lesion") is not None for rec in history):
        i = CSV_COLUMNS.index("loss_sdkt") + 1
        columns = CSV_COLUMNS[:i] + ("loss_lesion",) + CSV_COLUMNS[i:]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=columns)
        w.writeheader()
        for rec in history:
            row = epoch_row(rec)
            w.writerow({k: ("" if row[k] is None else (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]))
                        for k in columns})
    tmp.replace(path)
    return path


def plot_curves(path, history: Sequence[Dict]) -> Optional[Path]:
    """PNG of training loss and validation Dice per epoch; None (logged) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except Exception:  # ImportError, or a broken backend
        log.info("matplotlib is not installed; no curve plot written (pip install matplotlib)")
        return None
    path = Path(path)
    epochs = [r["epoch"] + 1 for r in history]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for part, style in (("total", "-"), ("seg", "--"), ("rc", ":"), ("sdkt", "-.")):
        ys = [r.get("loss", {}).get(part) for r in history]
        if any(y is not None for y in ys):
            ax.plot(epochs, [float("nan") if y is None else y for y in ys], style, label=f"loss {part}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    val = [(e, r["val_dice"]) for e, r in zip(epochs, history) if r.get("val_dice") is not None]
    if val:
        ax2.plot([v[0] for v in val], [v[1] for v in val], "o-", color="tab:green", label="validation Dice")
    ax2.set_ylabel("validation Dice")
    ax2.set_ylim(0, 1)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper right", fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


__all__ = ["ProgressReporter", "JsonLinesProgress", "TqdmProgress", "MultiProgress", "CallbackProgress",
           "make_reporter", "write_csv_log", "plot_curves", "LOSS_PARTS", "CSV_COLUMNS"]
