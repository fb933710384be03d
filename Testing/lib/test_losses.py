"""Training losses: soft Dice agrees with MONAI, Gram matrices are safe, SDKT and weighting."""
import pytest
import torch
from monai.losses import DiceLoss

from VeloxSegLib.losses import (LossConfig, VeloxSegLoss, deep_supervision_weights, dice_ce_loss, gram_matrix,
                                lesion_components, lesion_dice_loss, sdkt_loss, soft_dice_loss)
from VeloxSegLib.model.outputs import TrainOutput


def test_soft_dice_over_foreground_matches_monai():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 9, 10)
    target = torch.randint(0, 3, (2, 1, 8, 9, 10))
    ref = DiceLoss(include_background=False, to_onehot_y=True, softmax=True)(logits, target)
    assert soft_dice_loss(logits, target) == pytest.approx(ref.item(), abs=1e-6)


def test_batch_dice_matches_monai_batch_mode():
    torch.manual_seed(1)
    logits = torch.randn(3, 2, 6, 7, 8)
    target = torch.randint(0, 2, (3, 1, 6, 7, 8))
    target[0] = 0  # a patch without foreground, as the 1:1 sampler produces
    ref = DiceLoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)(logits, target)
    assert soft_dice_loss(logits, target, batch=True) == pytest.approx(ref.item(), abs=1e-6)
    assert soft_dice_loss(logits, target, batch=True) != pytest.approx(soft_dice_loss(logits, target).item())


def test_batch_dice_penalises_false_positives_in_an_empty_patch():
    # per-patch Dice gives an empty patch a constant ~1 (no gradient); batch Dice pushes its
    # foreground probabilities down through the shared denominator
    target = torch.zeros(2, 4, 4, 4, dtype=torch.long)
    target[1, :2] = 1
    grads = {}
    for batch in (False, True):
        logits = torch.zeros(2, 2, 4, 4, 4, requires_grad=True)
        soft_dice_loss(logits, target, batch=batch).backward()
        grads[batch] = logits.grad[0, 1].abs().max().item()  # empty patch, foreground logit
    assert grads[False] < 1e-6
    assert grads[True] > 1e-4 and grads[True] > 1000 * grads[False]


def test_loss_config_batch_dice_changes_the_segmentation_term():
    torch.manual_seed(2)
    out = TrainOutput(logits=[torch.randn(2, 2, 4, 4, 4)])
    target = torch.zeros(2, 4, 4, 4, dtype=torch.long)
    target[1, 1:3] = 1
    _, per_patch = VeloxSegLoss(LossConfig(batch_dice=False))(out, target)
    _, batch = VeloxSegLoss(LossConfig(batch_dice=True))(out, target)
    expected = dice_ce_loss(out.logits[0], target, batch_dice=True).item()
    assert batch["seg"] == pytest.approx(expected, abs=1e-6)
    assert batch["seg"] != pytest.approx(per_patch["seg"])


def test_gram_matrix_of_zero_features_is_zero_not_nan():
    g = gram_matrix(torch.zeros(2, 16, 4, 4, 4))
    assert torch.equal(g, torch.zeros(2, 16, 16))


def test_gram_matrix_is_normalized_by_c_h_w_d():
    x = torch.ones(1, 2, 2, 3, 4)
    assert torch.allclose(gram_matrix(x), torch.full((1, 2, 2), 24.0 / (2 * 24)))


def test_sdkt_is_mean_mse_over_teachers():
    s = torch.zeros(1, 2, 2)
    t1, t2 = torch.ones(1, 2, 2), torch.full((1, 2, 2), 3.0)
    assert sdkt_loss(s, [t1, t2]).item() == pytest.approx((1.0 + 9.0) / 2)


def test_deep_supervision_weights_are_normalized():
    assert deep_supervision_weights(4) == [0.25] * 4
    assert deep_supervision_weights(2, [3, 1]) == [0.75, 0.25]
    # nnU-Net-style halving serves networks with fewer heads: extra weights dropped, missing ones 0
    assert deep_supervision_weights(3, [1, 0.5, 0.25, 0.125]) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    assert deep_supervision_weights(1, [1, 0.5]) == [1.0]
    assert deep_supervision_weights(3, [2, 2]) == [0.5, 0.5, 0.0]
    for bad in ([0, 0], [1, -1]):
        with pytest.raises(ValueError):
            deep_supervision_weights(3, bad)


def test_train_command_passes_ds_weights_and_batch_dice_to_the_loss():
    from VeloxSegLib.cli import build_parser
    from VeloxSegLib.commands.train import config_from_args

    args = build_parser().parse_args(["train", "ds", "-o", "out", "--ds-weights", "1", "0.5", "--batch-dice"])
    config = config_from_args(args)
    assert config.ds_weights == (1.0, 0.5) and config.batch_dice is True
    args = build_parser().parse_args(["train", "ds", "-o", "out"])
    config = config_from_args(args)
    assert config.ds_weights is None and config.batch_dice is None  # train: off; finetune: the parent's


def test_total_loss_uses_paper_weights_and_can_switch_terms_off():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 4, 4, 4)
    y = torch.randint(0, 2, (1, 4, 4, 4))
    out = TrainOutput(logits=[torch.randn(1, 2, 4, 4, 4)], reconstruction=torch.zeros_like(x),
                      student_gram=torch.zeros(1, 3, 3), teacher_grams=[torch.ones(1, 3, 3)])
    total, parts = VeloxSegLoss()(out, y, x)
    seg = dice_ce_loss(out.logits[0], y).item()
    rc = (x ** 2).mean().item()
    assert total.item() == pytest.approx(seg + 0.5 * rc + 2.0 * 1.0, rel=1e-5)
    total2, parts2 = VeloxSegLoss(LossConfig(use_reconstruction=False, use_sdkt=False))(out, y, x)
    assert total2.item() == pytest.approx(seg, rel=1e-5) and set(parts2) == {"seg", "total"}


def test_gram_matrix_stays_float32_and_finite_under_autocast():
    """Under float16/bfloat16 autocast the sum over a 96^3 patch would overflow or lose digits:
    the Gram matrix is computed in float32 whatever the autocast state."""
    from VeloxSegLib.model.layers import gram_matrix

    x = torch.full((1, 4, 96, 96, 96), 300.0)
    ref = gram_matrix(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = gram_matrix(x.to(torch.bfloat16))
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert torch.allclose(got, ref, rtol=1e-6)


def test_deep_supervision_builds_the_one_hot_target_once_and_equals_separate_terms(monkeypatch):
    import torch.nn.functional as F

    from VeloxSegLib import losses

    torch.manual_seed(2)
    y = torch.randint(0, 3, (2, 6, 6, 6))
    out = TrainOutput(logits=[torch.randn(2, 3, 6, 6, 6, requires_grad=True) for _ in range(4)])
    weights = deep_supervision_weights(4, (1, 0.5, 0.25, 0.125))
    expected = sum(w * dice_ce_loss(lg, y, batch_dice=True) for w, lg in zip(weights, out.logits))
    calls = []
    real = F.one_hot
    monkeypatch.setattr(losses.F, "one_hot", lambda *a, **k: calls.append(1) or real(*a, **k))
    total, _ = VeloxSegLoss(LossConfig(ds_weights=(1, 0.5, 0.25, 0.125), batch_dice=True))(out, y[:, None])
    assert len(calls) == 1
    torch.testing.assert_close(total, expected)
    grads = torch.autograd.grad(total, out.logits)
    want = torch.autograd.grad(expected, out.logits)
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- lesion-wise Dice


def _confident_logits(pred):
    """Two-class logits whose softmax is 0/1 to float32 precision where ``pred`` says so."""
    pred = pred.float()
    return torch.stack([(1 - pred) * 40.0, pred * 40.0], dim=1)


def test_lesion_dice_weighs_a_missed_small_lesion_like_a_missed_large_one():
    # one 6x6x6 lesion found exactly, one single-voxel lesion missed, apart in one patch
    target = torch.zeros(1, 16, 16, 16, dtype=torch.long)
    target[0, 1:7, 1:7, 1:7] = 1
    target[0, 12, 12, 12] = 1
    pred = target.clone()
    pred[0, 12, 12, 12] = 0
    logits = _confident_logits(pred)
    # voxel-wise Dice barely notices the missed voxel: 2*216 / (217 + 216)
    assert soft_dice_loss(logits, target, batch=True).item() == pytest.approx(1 - 432 / 433, abs=1e-4)
    # lesion-wise: the large one scores 1 and the small one 0, so the mean loss is 1/2
    assert lesion_dice_loss(logits, target).item() == pytest.approx(0.5, abs=1e-4)


def test_lesion_dice_masks_the_other_lesions_but_counts_false_positives():
    target = torch.zeros(1, 16, 16, 16, dtype=torch.long)
    target[0, 1:3, 1:3, 1:3] = 1  # lesion A, 8 voxels
    target[0, 10:12, 10:12, 10:12] = 1  # lesion B, 8 voxels
    pred = target.clone()
    pred[0, 6, 6, 6:10] = 1  # 4 false-positive voxels, touching neither lesion
    logits = _confident_logits(pred)
    # each lesion: 2*8 / (8 + 8 own + 4 false positives); the other lesion's 8 predicted voxels are masked out
    assert lesion_dice_loss(logits, target).item() == pytest.approx(1 - 16 / 20, abs=1e-4)


def test_lesion_dice_counts_lesions_per_sample_and_class():
    torch.manual_seed(0)
    target = torch.zeros(2, 10, 10, 10, dtype=torch.long)
    target[0, 1:3, 1:3, 1:3] = 1
    target[0, 6:9, 6:9, 6:9] = 2
    target[1, 0, 0, 0] = 1
    target[1, 1, 1, 1] = 1  # diagonal neighbour of (0, 0, 0): one 26-connected lesion
    target[1, 5:8, 1:3, 1:3] = 1
    ids = lesion_components(target, 3)
    assert int(ids.max()) == 4
    assert len(set(ids[0][target[0] > 0].tolist())) == 2 and len(set(ids[1][target[1] > 0].tolist())) == 2
    assert (ids[target == 0] == 0).all()
    # against a direct computation, lesion by lesion, with random logits
    logits = torch.randn(2, 3, 10, 10, 10)
    probs = logits.softmax(1)
    terms = []
    for lesion in range(1, 5):
        mask = ids == lesion
        b = int(mask.nonzero()[0, 0])
        c = int(target[mask][0])
        others = (target[b] == c) & ~mask[b]
        p = probs[b, c] * (~others)
        terms.append(1 - 2 * (p * mask[b]).sum() / (p.sum() + mask[b].sum()))
    assert lesion_dice_loss(logits, target).item() == pytest.approx(torch.stack(terms).mean().item(), abs=1e-5)


def test_lesion_dice_is_zero_without_lesions_and_has_gradients_with_them():
    logits = torch.randn(2, 2, 8, 8, 8, requires_grad=True)
    empty = torch.zeros(2, 8, 8, 8, dtype=torch.long)
    assert lesion_dice_loss(logits, empty).item() == 0.0
    target = empty.clone()
    target[1, 2:4, 2:4, 2:4] = 1
    lesion_dice_loss(logits, target).backward()
    # a lesion is scored against its own sample only: sample 0 (no lesion) gets no gradient
    assert logits.grad[1].abs().sum() > 0 and logits.grad[0].abs().sum() == 0


def test_loss_config_adds_the_lesion_term_only_when_weighted():
    torch.manual_seed(0)
    y = torch.zeros(1, 8, 8, 8, dtype=torch.long)
    y[0, 1:3, 1:3, 1:3] = 1
    y[0, 6, 6, 6] = 1
    out = TrainOutput(logits=[torch.randn(1, 2, 8, 8, 8), torch.randn(1, 2, 8, 8, 8)])
    off = LossConfig(use_reconstruction=False, use_sdkt=False)
    base, parts = VeloxSegLoss(off)(out, y)
    assert "lesion" not in parts
    on = LossConfig(use_reconstruction=False, use_sdkt=False, lambda_lesion=0.7)
    total, parts = VeloxSegLoss(on)(out, y)
    assert parts["lesion"] == pytest.approx(lesion_dice_loss(out.logits[0], y).item(), abs=1e-6)
    assert total.item() == pytest.approx(base.item() + 0.7 * parts["lesion"], rel=1e-6)


def test_train_command_passes_the_lesion_dice_weight_and_checks_it():
    from VeloxSegLib.cli import build_parser
    from VeloxSegLib.commands.train import config_from_args
    from VeloxSegLib.errors import ConfigError

    config = config_from_args(build_parser().parse_args(["train", "ds", "-o", "out", "--lesion-dice", "1.5"]))
    assert config.lesion_dice == 1.5
    assert config_from_args(build_parser().parse_args(["train", "ds", "-o", "out"])).lesion_dice is None
    config = config_from_args(build_parser().parse_args(["train", "ds", "-o", "out", "--lesion-dice", "-1"]))
    with pytest.raises(ConfigError, match="--lesion-dice"):
        config.check()
