"""The learning-rate schedule: linear warm-up, cosine decay, the paper's proportions, resumable state."""
import math

import pytest
import torch

from VeloxSegLib.errors import ConfigError
from VeloxSegLib.train.schedule import (PAPER_LR, PAPER_MIN_LR, WarmupCosineSchedule, min_lr_for, recipe_schedule,
                                        warmup_steps_for)


def _optimizer(lr=1.0):
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def test_warmup_rises_linearly_to_the_base_lr():
    opt = _optimizer()
    s = WarmupCosineSchedule(opt, total_steps=100, warmup_steps=4, base_lr=1.0, min_lr=0.0)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        s.step()
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, s.lr_at(4)])


def test_cosine_decays_to_min_lr_at_the_end_and_stays():
    s = WarmupCosineSchedule(_optimizer(), total_steps=110, warmup_steps=10, base_lr=2.0, min_lr=0.5)
    assert s.lr_at(10) == pytest.approx(2.0)
    assert s.lr_at(60) == pytest.approx(0.5 + 0.75 * (1 + math.cos(math.pi * 0.5)))
    assert s.lr_at(110) == pytest.approx(0.5)
    assert s.lr_at(500) == pytest.approx(0.5)
    values = [s.lr_at(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_recipe_keeps_the_papers_proportions_for_any_length():
    # 300 epochs x 250 iterations: 10 warm-up epochs, floor 6e-6
    s = recipe_schedule(_optimizer(), 300, 250)
    assert s.warmup_steps == 10 * 250 and s.total_steps == 75000
    assert s.base_lr == PAPER_LR and s.min_lr == pytest.approx(PAPER_MIN_LR)
    short = recipe_schedule(_optimizer(), 30, 10)
    assert short.warmup_steps == 10  # 1/30 of 300 steps
    assert warmup_steps_for(1) == 0 and warmup_steps_for(5) == 1
    assert min_lr_for(1e-4) == pytest.approx(1e-4 * PAPER_MIN_LR / PAPER_LR)


def test_state_round_trip_restores_the_lr():
    opt = _optimizer()
    s = recipe_schedule(opt, 10, 10)
    for _ in range(37):
        s.step()
    opt2 = _optimizer()
    s2 = recipe_schedule(opt2, 10, 10)
    s2.load_state_dict(s.state_dict())
    assert s2.last_step == 37 and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_resuming_with_another_length_is_refused():
    s = recipe_schedule(_optimizer(), 10, 10)
    with pytest.raises(ConfigError, match="same --epochs"):
        recipe_schedule(_optimizer(), 20, 10).load_state_dict(s.state_dict())


def test_a_group_with_a_start_step_waits_then_ramps_up_on_its_own():
    held, fresh = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [held], "start_step": 3}, {"params": [fresh]}], lr=1.0)
    s = WarmupCosineSchedule(opt, total_steps=100, warmup_steps=2, base_lr=1.0, min_lr=0.0)
    seen = []
    for _ in range(6):
        seen.append((opt.param_groups[0]["lr"], opt.param_groups[1]["lr"], s.started(opt.param_groups[0])))
        s.step()
    # the fresh group follows the schedule; the held one is 0 for steps 0-2, then its own 2-step ramp
    assert [f for _, f, _ in seen] == pytest.approx([0.5, 1.0, s.lr_at(2), s.lr_at(3), s.lr_at(4), s.lr_at(5)])
    assert [h for h, _, _ in seen] == pytest.approx([0, 0, 0, 0.5 * s.lr_at(3), s.lr_at(4), s.lr_at(5)])
    assert [st for _, _, st in seen] == [False, False, False, True, True, True]
    assert s.group_lr(opt.param_groups[0], 50) == pytest.approx(s.lr_at(50))
