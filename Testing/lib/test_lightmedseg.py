"""LightMedSeg (peer network re-implemented from its abstract): shapes, size, gradients, overfit."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from VeloxSegLib.model.lightmedseg import LightMedSeg
from VeloxSegLib.model.outputs import TrainOutput

PAPER_PARAMS = 0.48e6


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _eval_path_params(model: LightMedSeg, size: int = 32) -> int:
    """Number of parameters that receive a gradient from the eval-mode output."""
    model.eval()
    model.zero_grad(set_to_none=True)
    x = torch.randn(1, sum(model.in_channels), size, size, size)
    model(x).square().mean().backward()
    return sum(p.numel() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("in_channels, num_classes, size", [((4,), 4, 32), ((1, 1), 2, 64)])
def test_eval_output_has_num_classes_and_input_spatial_shape(in_channels, num_classes, size):
    torch.manual_seed(0)
    model = LightMedSeg(in_channels=in_channels, num_classes=num_classes, patch_size=(size,) * 3).eval()
    x = torch.randn(2, sum(in_channels), size, size, size)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, num_classes, size, size, size)
    assert torch.isfinite(y).all()


def test_eval_accepts_anisotropic_multiple_of_16_input():
    model = LightMedSeg(in_channels=(1,), num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 16, 48, 32)).shape == (1, 3, 16, 48, 32)


def test_eval_path_parameter_count_is_within_5_percent_of_paper():
    torch.manual_seed(0)
    n = _eval_path_params(LightMedSeg(in_channels=(4,), num_classes=4))
    assert abs(n - PAPER_PARAMS) / PAPER_PARAMS < 0.05, n


def test_forward_train_returns_train_output_with_full_size_logits():
    model = LightMedSeg(in_channels=(1, 1), num_classes=2, patch_size=(32, 32, 32)).train()
    out = model.forward_train(torch.randn(1, 2, 32, 32, 32))
    assert isinstance(out, TrainOutput)
    assert len(out.logits) >= 1
    assert all(t.shape == (1, 2, 32, 32, 32) for t in out.logits)
    assert out.reconstruction is None and out.student_gram is None and out.teacher_grams == []


def test_forward_train_step_gives_gradient_to_every_parameter():
    torch.manual_seed(0)
    model = LightMedSeg(in_channels=(4,), num_classes=4, patch_size=(32, 32, 32)).train()
    x = torch.randn(1, 4, 32, 32, 32)
    target = torch.randint(0, 4, (1, 32, 32, 32))
    loss = sum(F.cross_entropy(t, target) for t in model.forward_train(x).logits)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, missing


def _sphere_case(size: int = 32):
    g = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    r2 = g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2
    label = (r2 <= (size / 4) ** 2).long()
    gen = torch.Generator().manual_seed(0)
    image = label.float() + 0.3 * torch.randn(size, size, size, generator=gen)
    return image[None, None], label[None]


def _ce_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    ce = F.cross_entropy(logits, target)
    prob = logits.softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 4, 1, 2, 3).float()
    inter = (prob * onehot).sum((0, 2, 3, 4))
    denom = prob.sum((0, 2, 3, 4)) + onehot.sum((0, 2, 3, 4))
    dice = (2 * inter + 1e-5) / (denom + 1e-5)
    return ce + (1 - dice.mean())


def test_overfits_one_synthetic_sphere_loss_falls_by_half():
    torch.manual_seed(0)
    image, label = _sphere_case(32)
    model = LightMedSeg(in_channels=(1,), num_classes=2, patch_size=(32, 32, 32)).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = _ce_dice(model.forward_train(image).logits[0], label)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
