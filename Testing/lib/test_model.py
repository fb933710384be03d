"""The VeloxSeg network: presets, sizes, windows, JL rule, training outputs and the fast path."""
import itertools
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from VeloxSegLib import build_model
from VeloxSegLib.errors import ConfigError
from VeloxSegLib.losses import VeloxSegLoss
from VeloxSegLib.model import list_models, set_fast_path
from VeloxSegLib.model.jl import c_group, jl_group_sizes
from VeloxSegLib.model.veloxseg import min_big_windows

VELOX = ["veloxseg-s", "veloxseg-b", "veloxseg-b+", "veloxseg-l"]


def inference_params_and_gmac(model, x):
    """Parameters that receive a gradient from the eval-mode output; MACs = FLOPs / 2."""
    model.eval()
    set_fast_path(model, False)
    model.zero_grad()
    model(x).sum().backward()
    params = sum(p.numel() for p in model.parameters() if p.grad is not None)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return params / 1e6, counter.get_total_flops() / 2e9


@pytest.mark.parametrize("name", VELOX + ["lightmedseg"])
@pytest.mark.parametrize("in_channels", [(1,), (1, 1), (2, 1, 1), (1, 1, 1, 1)])
def test_eval_output_shape_for_every_preset_and_modality_count(name, in_channels):
    torch.manual_seed(0)
    model = build_model(name, in_channels=in_channels, num_classes=3, patch_size=(64, 64, 64)).eval()
    with torch.inference_mode():
        out = model(torch.randn(1, sum(in_channels), 64, 64, 64))
    assert out.shape == (1, 3, 64, 64, 64)
    assert torch.isfinite(out).all()


SIZE_TARGETS = [
    # name, in_channels, classes, patch, params (M), GMAC of the authors' implementation
    ("veloxseg-b", (1, 1), 2, (96, 96, 96), 1.669, 1.752),
    ("veloxseg-b", (1, 1), 2, (128, 128, 64), 1.670, 2.091),
    ("veloxseg-s", (1, 1), 2, (96, 96, 96), 1.201, 1.382),
    ("veloxseg-b+", (1, 1), 2, (96, 96, 96), 5.278, 4.000),
    ("veloxseg-l", (1, 1), 2, (96, 96, 96), 2.674, 2.467),
    ("veloxseg-b", (4,), 4, (96, 96, 96), 1.469, 2.563),
    ("veloxseg-b", (2,), 2, (96, 96, 96), 1.401, 1.618),
    ("veloxseg-b", (1,), 2, (96, 96, 96), 1.394, 1.528),
]


@pytest.mark.parametrize("name,in_channels,classes,patch,params,gmac", SIZE_TARGETS)
def test_parameters_and_macs_match_the_published_network_within_one_percent(name, in_channels, classes, patch,
                                                                             params, gmac):
    torch.manual_seed(0)
    model = build_model(name, in_channels=in_channels, num_classes=classes, patch_size=patch)
    p, g = inference_params_and_gmac(model, torch.randn(1, sum(in_channels), *patch))
    assert p == pytest.approx(params, rel=0.01)
    assert g == pytest.approx(gmac, rel=0.01)


def test_teachers_are_training_only_and_add_parameters():
    full = build_model("veloxseg-b", (1, 1), 2, (96, 96, 96))
    total = sum(p.numel() for p in full.parameters()) / 1e6
    teachers = sum(p.numel() for p in full.teachers.parameters()) / 1e6
    assert 2.2 < total < 2.4  # about 2.29 M with teachers (model.md)
    assert teachers > 0.5


def test_window_rule_reproduces_both_published_settings():
    assert min_big_windows((96, 96, 96)) == [(3, 3, 3), (6, 6, 6), (3, 3, 3), (3, 3, 3)]
    assert min_big_windows((128, 128, 64)) == [(4, 4, 2), (8, 8, 4), (4, 4, 2), (4, 4, 2)]


def test_window_pairs_and_tokens_per_stage_for_96_cubed():
    model = build_model("veloxseg-b", (1, 1), 2, (96, 96, 96))
    attn = [stage[0].attn for stage in model.attn_stages]
    assert [a.bigs for a in attn] == [
        [(3, 3, 3), (6, 6, 6), (12, 12, 12), (24, 24, 24)],
        [(6, 6, 6), (12, 12, 12)],
        [(3, 3, 3), (6, 6, 6)],
        [(3, 3, 3)],
    ]
    assert [a.smalls[-1] for a in attn] == [(8, 8, 8), (2, 2, 2), (2, 2, 2), (1, 1, 1)]
    assert [a.num_tokens for a in attn] == [27, 216, 27, 27]
    assert [(a.num_heads, a.qk_dim) for a in attn] == [(1, 4), (2, 8), (2, 8), (4, 16)]


@pytest.mark.parametrize("patch", [(100, 96, 96), (96, 96, 80), (32, 32, 32), (96, 96)])
def test_untileable_patch_size_raises_value_error_naming_working_sizes(patch):
    with pytest.raises(ValueError) as info:
        build_model("veloxseg-b", patch_size=patch)
    assert isinstance(info.value, ConfigError)
    assert "multiple of 32" in str(info.value) and "96" in str(info.value)


def test_wrong_input_size_is_a_clear_error():
    model = build_model("veloxseg-b", (1, 1), 2, (64, 64, 64)).eval()
    with pytest.raises(ConfigError, match="patch size"):
        model(torch.zeros(1, 2, 96, 96, 96))
    with pytest.raises(ConfigError, match="expected input"):
        model(torch.zeros(1, 3, 64, 64, 64))


@pytest.mark.parametrize("M,expected", [
    (1, [4.2, 6.2, 8.3, 10.4]),
    (2, [4.9, 6.9, 9.0, 11.1]),
    (4, [5.5, 7.6, 9.7, 11.8]),
])
def test_jl_bound_reproduces_eq14(M, expected):
    values = [c_group(M, v) for v in (4 ** 3, 8 ** 3, 16 ** 3, 32 ** 3)]
    assert [round(v, 1) for v in values] == expected


@pytest.mark.parametrize("M", [1, 2, 3, 4])
def test_jl_group_sizes_round_to_the_published_setting(M):
    assert jl_group_sizes(M, [16, 32, 64, 128], n=4) == [4, 8, 8, 16]


def test_jl_bound_scales_with_alpha_and_rounds_to_divisors():
    assert c_group(2, 64, alpha=2.0) == pytest.approx(2 * math.log(128))
    sizes = jl_group_sizes(2, [24, 48, 96, 192], n=3)
    assert all(w % g == 0 for g, w in zip(sizes, [24, 48, 96, 192]))


def test_presets_use_the_jl_rule():
    model = build_model("veloxseg-b", (1, 1), 2, (64, 64, 64))
    groups = [stage[0].conv.branches[0][0].groups for stage in model.conv_stages]
    assert groups == [16 // 4, 32 // 8, 64 // 8, 128 // 16]


def test_every_preset_is_listed():
    assert set(list_models()) == {"veloxseg-s", "veloxseg-b", "veloxseg-b+", "veloxseg-l", "lightmedseg"}


def test_training_outputs_are_named_and_shaped():
    torch.manual_seed(0)
    model = build_model("veloxseg-b", (1, 1), 3, (64, 64, 64)).train()
    out = model.forward_train(torch.randn(2, 2, 64, 64, 64))
    assert len(out.logits) == 4 and all(lg.shape == (2, 3, 64, 64, 64) for lg in out.logits)
    assert out.reconstruction.shape == (2, 2, 64, 64, 64)
    assert out.student_gram.shape == (2, 16, 16)
    assert len(out.teacher_grams) == 2 and out.teacher_grams[0].shape == (2, 16, 16)


def test_a_training_step_reaches_every_parameter_teachers_included():
    torch.manual_seed(0)
    model = build_model("veloxseg-b", (1, 1), 2, (64, 64, 64)).train()
    x = torch.randn(1, 2, 64, 64, 64)
    y = (x[:, :1] > 1.0).long()
    loss, parts = VeloxSegLoss()(model.forward_train(x), y, x)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert missing == []
    assert set(parts) == {"seg", "rc", "sdkt", "total"}


def test_eval_output_identical_without_training_only_modules():
    torch.manual_seed(0)
    full = build_model("veloxseg-b", (1, 1), 2, (64, 64, 64)).eval()
    slim = build_model("veloxseg-b", (1, 1), 2, (64, 64, 64), with_teachers=False, deep_supervision=False).eval()
    slim.load_state_dict(full.inference_state_dict(), strict=True)
    x = torch.randn(1, 2, 64, 64, 64)
    with torch.inference_mode():
        assert torch.equal(full(x), slim(x))


@pytest.mark.parametrize("name,in_channels,patch,batch", [
    ("veloxseg-b", (1, 1), (96, 96, 96), 1),
    ("veloxseg-b", (1, 1), (128, 128, 64), 1),
    ("veloxseg-s", (1, 1), (64, 64, 64), 2),
    ("veloxseg-l", (2,), (64, 64, 64), 1),
    ("veloxseg-b+", (1, 1, 1, 1), (64, 64, 32), 1),
    ("veloxseg-b", (4,), (64, 64, 64), 2),
])
def test_fast_path_computes_the_same_function_as_the_plain_path(name, in_channels, patch, batch):
    torch.manual_seed(0)
    model = build_model(name, in_channels, 3, patch, with_teachers=False).eval()
    x = torch.randn(batch, sum(in_channels), *patch)
    with torch.inference_mode():
        plain = set_fast_path(model, False)(x)
        fast = set_fast_path(model, True)(x)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("use_fft", [True, False])
def test_fast_path_with_and_without_fft_convolutions_equals_the_plain_path(use_fft, monkeypatch):
    """Whatever this CPU's default, force JLConv's FFT convolutions on (every grid) or off."""
    from VeloxSegLib.model import fastops

    monkeypatch.setattr(fastops, "fft_conv_default", lambda x: use_fft and x.dtype == torch.float32)
    calls = []
    real = fastops.grouped_conv_fft
    monkeypatch.setattr(fastops, "grouped_conv_fft", lambda x, convs, *a, **k: calls.append(
        [c.kernel_size for c in convs]) or real(x, convs, *a, **k))
    torch.manual_seed(1)
    model = build_model("veloxseg-b", (1, 1), 2, (64, 64, 64), with_teachers=False).eval()
    x = torch.randn(2, 2, 64, 64, 64)
    with torch.inference_mode():
        plain = set_fast_path(model, False)(x)
        fast = set_fast_path(model, True)(x)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)
    assert len(calls) == (7 if use_fft else 0)  # every JLConv of veloxseg-b, or none
    assert all(kernels == [(5, 5, 5)] for kernels in calls)  # the 3^3 branch stays direct


@pytest.mark.parametrize("name,use_fft", [("veloxseg-b", True), ("veloxseg-b", False), ("veloxseg-s", True)])
def test_fast_path_equals_the_plain_path_with_every_parameter_random(name, use_fft, monkeypatch):
    """He initialization leaves every bias at zero and every norm at identity; the fast path skips
    the biases an instance norm cancels and folds others, so compare with all of them random
    (veloxseg-s: its single-kernel JL convolutions have no norm, their biases must stay)."""
    from VeloxSegLib.model import fastops

    monkeypatch.setattr(fastops, "fft_conv_default", lambda x: use_fft and x.dtype == torch.float32)
    torch.manual_seed(5)
    model = build_model(name, (1, 1), 3, (64, 64, 64), with_teachers=False).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    x = torch.randn(2, 2, 64, 64, 64)
    with torch.inference_mode():
        plain = set_fast_path(model, False)(x)
        fast = set_fast_path(model, True)(x)
    scale = plain.abs().max().item()
    assert scale > 10.0  # random biases everywhere: logits in the hundreds, far from trivial
    # float rounding grows with the logits: within 1e-5 of their scale (a bias dropped that an
    # instance norm does not cancel moves them by about 0.2 of it)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5 * scale)


def test_fast_path_is_not_used_when_gradients_are_needed():
    torch.manual_seed(0)
    model = build_model("veloxseg-b", (1, 1), 2, (64, 64, 64), with_teachers=False).eval()
    x = torch.randn(1, 2, 64, 64, 64)
    out = set_fast_path(model, True)(x)
    out.sum().backward()
    assert model.head.conv.weight.grad is not None


def test_dropout_keeps_one_minus_p_of_the_values_scaled_and_is_the_identity_in_eval():
    from VeloxSegLib.model.layers import Dropout

    drop = Dropout(0.1).train()
    x = torch.ones(200_000, requires_grad=True)
    torch.manual_seed(7)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.005
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.9))
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad, y.detach())  # the gradient goes through the same mask
    torch.manual_seed(7)
    assert torch.equal(drop(x), y)  # the global seed decides the mask
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)


def test_training_path_is_the_same_function_as_the_literal_modules(monkeypatch):
    """With autograd on the CPU the JL convolutions run channels-last (forced here, whatever this
    CPU's default), the patch embeddings and 1x1 convolutions as GEMMs and the deep-supervision
    upsampling as three small products: logits, reconstruction, loss and gradients equal those of
    the literal ``nn.Conv3d`` and ``F.interpolate`` calls."""
    from VeloxSegLib.model import fastops, layers

    torch.manual_seed(8)
    model = build_model("veloxseg-b", (1, 1), 2, (64, 64, 64), conv_drop=0.0, attn_drop=0.0, proj_drop=0.0).train()
    x = torch.randn(2, 2, 64, 64, 64)
    y = (x[:, :1] > 1.0).long()
    params = [model.patch_embeds[0].weight, model.conv_stages[0][0].conv.branches[2][0].weight,
              model.decoder.stages[0][0].conv.branches[1][0].weight, model.head.conv.weight]

    def run():
        loss, _ = VeloxSegLoss()(out := model.forward_train(x), y, x)
        return out, loss, torch.autograd.grad(loss, params)

    calls = {"patchify": 0, "channels_last": 0}
    real_patchify, real_grouped = fastops.patchify_conv, fastops.grouped_conv

    def grouped(conv, t, channels_last=None):
        calls["channels_last"] += 1
        return real_grouped(conv, t, channels_last=True)

    monkeypatch.setattr(fastops, "grouped_conv", grouped)
    monkeypatch.setattr(fastops, "patchify_conv", lambda *a: calls.__setitem__("patchify", calls["patchify"] + 1)
                        or real_patchify(*a))
    out, loss, grads = run()
    # 2 modalities; the 3^3 and 5^3 branches of 13 JLConvs: the student's 4 encoder and 3 decoder
    # stages and the 3 decoder stages of each of the 2 teachers
    assert calls == {"patchify": 2, "channels_last": 2 * 13}
    monkeypatch.setattr(fastops, "grouped_conv", lambda conv, t, channels_last=None: conv(t))
    monkeypatch.setattr(fastops, "patchify_conv", lambda t, w, b: torch.nn.functional.conv3d(t, w, b, stride=4))
    monkeypatch.setattr(fastops, "upsample_trilinear", lambda t, size: torch.nn.functional.interpolate(
        t, size=size, mode="trilinear", align_corners=True))
    monkeypatch.setattr(layers.Conv1x1, "forward", torch.nn.Conv3d.forward)
    ref_out, ref_loss, ref_grads = run()
    for a, b in zip(out.logits + [out.reconstruction], ref_out.logits + [ref_out.reconstruction]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_veloxseg_b_overfits_one_synthetic_case():
    torch.manual_seed(0)
    model = build_model("veloxseg-b", (1, 1), 2, (64, 64, 64), conv_drop=0.0, attn_drop=0.0, proj_drop=0.0).train()
    zz, yy, xx = torch.meshgrid(*[torch.arange(64.0)] * 3, indexing="ij")
    sphere = (((zz - 30) ** 2 + (yy - 34) ** 2 + (xx - 28) ** 2) < 12 ** 2).float()
    g = torch.Generator().manual_seed(1)
    image = torch.stack([sphere * 2 + 0.3 * torch.randn(64, 64, 64, generator=g),
                         sphere + 0.3 * torch.randn(64, 64, 64, generator=g)])[None]
    target = sphere.long()[None]
    loss_fn = VeloxSegLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss, _ = loss_fn(model.forward_train(image), target, image)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert min(losses[-5:]) < 0.5 * losses[0]


@pytest.mark.parametrize("old_n, new_n", [((2, 2, 2), (3, 3, 3)), ((2, 2, 1), (3, 4, 2)), ((6, 6, 6), (4, 4, 4)),
                                          ((4, 4, 2), (6, 6, 3))])
def test_bias_table_resizing_keeps_every_shared_offset_and_extends_the_edges(old_n, new_n):
    from VeloxSegLib.model.pwa import resize_relative_position_bias_table

    heads = 2
    old_shape = [2 * k - 1 for k in old_n]
    table = torch.randn(math.prod(old_shape), heads)
    new = resize_relative_position_bias_table(table, old_n, new_n)
    assert new.shape == (math.prod(2 * k - 1 for k in new_n), heads)
    g_old, g_new = table.reshape(*old_shape, heads), new.reshape(*[2 * k - 1 for k in new_n], heads)
    for off in itertools.product(*[range(-(k - 1), k) for k in new_n]):  # every offset of the new window
        nearest = [min(max(o, -(k - 1)), k - 1) for o, k in zip(off, old_n)]  # = off when the old table has it
        want = g_old[tuple(o + k - 1 for o, k in zip(nearest, old_n))]
        assert torch.equal(g_new[tuple(o + k - 1 for o, k in zip(off, new_n))], want)
    if all(n >= o for n, o in zip(new_n, old_n)):  # growing then cutting back gives the table back
        assert torch.equal(resize_relative_position_bias_table(new, new_n, old_n), table)
    with pytest.raises(ValueError, match="does not fit"):
        resize_relative_position_bias_table(table[:-1], old_n, new_n)


def test_refine_head_starts_as_the_identity_then_learns_from_the_image():
    """``refine_channels``: the network with the head, given the same other weights, computes the
    same logits as without it (the head's output layer starts at zero); one optimizer step on a
    target the image decides moves the head's output layer and with it the logits; the head reads
    the image itself (its input gradient reaches the image channels)."""
    torch.manual_seed(3)
    plain = build_model("veloxseg-b", (1, 1), 2, (64, 64, 64), with_teachers=False).eval()
    torch.manual_seed(3)
    refined = build_model("veloxseg-b", (1, 1), 2, (64, 64, 64), with_teachers=False, refine_channels=4).eval()
    report = refined.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(report.missing_keys) == ["refine.conv.bias", "refine.conv.weight", "refine.out.bias",
                                           "refine.out.weight"]
    assert refined.refine.conv.weight.shape == (4, 2 + 2, 3, 3, 3)
    x = torch.randn(1, 2, 64, 64, 64)
    with torch.no_grad():
        before = refined(x)
        assert torch.equal(before, plain(x))
        assert torch.equal(refined.forward_train(x).logits[0], plain.forward_train(x).logits[0])
    assert "refine.out.weight" in refined.inference_state_dict()  # shipped with the bundle, not training-only
    opt = torch.optim.SGD(refined.refine.parameters(), lr=0.1)
    target = (x[:, 1:] > 0).long()[:, 0]
    xg = x.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(refined(xg), target)
    loss.backward()
    assert xg.grad.abs().sum() > 0
    assert refined.refine.out.weight.grad.abs().sum() > 0
    opt.step()
    with torch.no_grad():
        after = refined(x)
        assert not torch.equal(after, before)
        assert torch.nn.functional.cross_entropy(after, target) < loss.detach()
    with pytest.raises(ConfigError, match="refine_channels"):
        build_model("veloxseg-b", (1, 1), 2, (64, 64, 64), refine_channels=-1)
