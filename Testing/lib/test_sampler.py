"""Patch sampling (1:1 foreground/background, padding, per-rank streams) and augmentation."""
import numpy as np
import pytest

from VeloxSegLib.train.augment import AugmentParams, Augmenter, rotate_z
from VeloxSegLib.train.sampler import CaseData, PatchSampler, crop_padded, rank_generator


def _case(name="c", shape=(40, 48, 44), lesion=((10, 14), (20, 26), (30, 35))):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(2,) + shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[tuple(slice(a, b) for a, b in lesion)] = 1
    return CaseData(name, image, label, pad_values=(-3.0, -1.0))


def test_every_other_patch_contains_foreground():
    s = PatchSampler([_case()], (16, 16, 16), batch_size=1, rng=rank_generator(0))
    has_fg = [bool(s.sample()[1].any()) for _ in range(40)]
    assert all(has_fg[0::2])  # foreground draws always hold the lesion
    assert sum(has_fg[1::2]) < 10  # background draws rarely do (a small lesion)


def test_batches_alternate_foreground_and_background_within_a_batch():
    s = PatchSampler([_case()], (16, 16, 16), batch_size=4, rng=rank_generator(1))
    _, y = s.sample()
    assert y.shape == (4, 16, 16, 16)
    assert y[0].any() and y[2].any()


def test_regions_beyond_the_volume_are_padded_per_channel():
    case = _case()
    out = crop_padded(case.image, (-4, 0, 0), (8, 8, 8), case.pad_values)
    assert np.all(out[0, :4] == -3.0) and np.all(out[1, :4] == -1.0)
    assert np.array_equal(out[:, 4:], case.image[:, :4, :8, :8])
    lab = crop_padded(case.label, (100, 0, 0), (4, 4, 4), 0)
    assert lab.shape == (4, 4, 4) and not lab.any()


def test_sampler_state_restores_the_same_patch_stream():
    a = PatchSampler([_case(), _case("d")], (16, 16, 16), 2, rank_generator(3), Augmenter())
    for _ in range(3):
        a.sample()
    state = a.state_dict()
    expected = a.sample()
    b = PatchSampler([_case(), _case("d")], (16, 16, 16), 2, rank_generator(99), Augmenter())
    b.load_state_dict(state)
    got = b.sample()
    assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])


def test_ranks_draw_different_patches():
    x0 = PatchSampler([_case()], (16, 16, 16), 2, rank_generator(0, rank=0)).sample()[0]
    x1 = PatchSampler([_case()], (16, 16, 16), 2, rank_generator(0, rank=1)).sample()[0]
    assert not np.array_equal(x0, x1)


def test_augmented_patches_have_the_patch_shape_and_keep_label_values():
    s = PatchSampler([_case()], (16, 24, 20), 1, rank_generator(5), Augmenter(flip_p=0.5, rotate_p=1.0))
    for _ in range(6):
        x, y = s.sample()
        assert x.shape == (1, 2, 16, 24, 20) and y.shape == (1, 16, 24, 20)
        assert set(np.unique(y)) <= {0, 1}


def test_rotation_by_zero_is_the_central_crop_and_source_covers_rotated_corners():
    img = np.arange(2 * 4 * 10 * 10, dtype=np.float32).reshape(2, 4, 10, 10)
    lab = (img[0] % 3 == 0).astype(np.uint8)
    out, lab_out = rotate_z(img, lab, 0.0, (4, 6, 6))
    assert np.allclose(out, img[:, :, 2:8, 2:8], atol=1e-4)
    assert np.array_equal(lab_out, lab[:, 2:8, 2:8])
    assert AugmentParams(angle_deg=15).source_shape((8, 32, 32)) > (8, 32, 32)


def test_z_flip_reverses_only_z():
    img = np.random.default_rng(0).normal(size=(1, 4, 6, 6)).astype(np.float32)
    lab = (img[0] > 0).astype(np.uint8)
    out, lab_out = Augmenter().apply(img, lab, AugmentParams(flip_z=True), (4, 6, 6))
    assert np.array_equal(out, img[:, ::-1]) and np.array_equal(lab_out, lab[::-1])


def test_modality_dropout_zeroes_one_channel_of_a_patch_and_keeps_the_label():
    img = np.random.default_rng(0).normal(size=(2, 4, 6, 6)).astype(np.float32)
    lab = (img[0] > 0).astype(np.uint8)
    before = img.copy()
    out, lab_out = Augmenter().apply(img, lab, AugmentParams(drop_channel=1), (4, 6, 6))
    assert np.array_equal(out[0], img[0]) and not out[1].any() and np.array_equal(lab_out, lab)
    assert np.array_equal(img, before)  # the case's own array (a memory map in training) is not written


def test_modality_dropout_drops_each_channel_at_its_rate():
    aug = Augmenter(modality_dropout=0.3, channels=2)
    rng = np.random.default_rng(3)
    drops = np.array([aug.draw(rng).drop_channel for _ in range(4000)])
    assert abs((drops >= 0).mean() - 0.3) < 0.03
    assert abs((drops == 0).mean() - 0.15) < 0.02 and abs((drops == 1).mean() - 0.15) < 0.02
    s = PatchSampler([_case()], (16, 24, 20), 1, rank_generator(5), Augmenter(modality_dropout=0.9, channels=2))
    zeroed = [int(c) for x, _ in (s.sample() for _ in range(20)) for c in range(2) if not x[0, c].any()]
    assert 12 <= len(zeroed) <= 20 and set(zeroed) == {0, 1}


def test_without_modality_dropout_the_recipe_draws_the_same_patches():
    """Off (the default), the option draws no random number: runs and resumes are as before it."""
    a, b = np.random.default_rng(9), np.random.default_rng(9)
    for _ in range(50):
        assert Augmenter().draw(a) == Augmenter(modality_dropout=0.0, channels=2).draw(b)
    assert a.random() == b.random()
    assert all(Augmenter(channels=2).draw(a).drop_channel == -1 for _ in range(50))


def test_a_case_without_foreground_still_gives_patches():
    case = _case(lesion=((0, 0), (0, 0), (0, 0)))
    x, y = PatchSampler([case], (16, 16, 16), 2, rank_generator(0)).sample()
    assert x.shape == (2, 2, 16, 16, 16) and not y.any()


@pytest.mark.parametrize("fraction,expected", [(0.5, 0.5), (1 / 3, 1 / 3)])
def test_foreground_fraction_is_exact_over_a_run(fraction, expected):
    s = PatchSampler([_case()], (8, 8, 8), 1, rank_generator(0), fg_fraction=fraction)
    draws = []
    for _ in range(30):
        draws.append(s._is_foreground_draw())
        s.drawn += 1
    assert sum(draws) / len(draws) == pytest.approx(expected)


def _stream(sampler, n):
    return [sampler.sample() for _ in range(n)]


@pytest.mark.parametrize("threads,batch", [(1, 2), (3, 2), (4, 3)])
def test_loader_threads_give_the_same_patch_stream(threads, batch):
    cases = [_case(), _case("d", lesion=((2, 9), (30, 40), (5, 12)))]
    plain = _stream(PatchSampler(cases, (16, 16, 16), batch, rank_generator(4), Augmenter()), 7)
    threaded = PatchSampler(cases, (16, 16, 16), batch, rank_generator(4), Augmenter(), threads=threads)
    try:
        got = _stream(threaded, 7)
        assert len(threaded._pending) == threaded.depth - 1 >= 1  # batches really were prepared ahead
    finally:
        threaded.close()
    for (xa, ya), (xb, yb) in zip(plain, got):
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)


def test_threaded_state_is_that_of_the_batches_handed_out():
    cases = [_case(), _case("d")]
    plain = PatchSampler(cases, (16, 16, 16), 2, rank_generator(8), Augmenter())
    threaded = PatchSampler(cases, (16, 16, 16), 2, rank_generator(8), Augmenter(), threads=2)
    try:
        _stream(plain, 3)
        _stream(threaded, 3)  # more batches than these were drawn ahead
        assert threaded._own_state()["drawn"] > plain.drawn == 6
        state = threaded.state_dict()
        assert state == plain.state_dict()
        expected = _stream(plain, 2)
        # a run resumed from that state, with or without threads, goes on with the same batches
        for resumed in (PatchSampler(cases, (16, 16, 16), 2, rank_generator(0), Augmenter()),
                        PatchSampler(cases, (16, 16, 16), 2, rank_generator(0), Augmenter(), threads=2)):
            resumed.load_state_dict(state)
            try:
                got = _stream(resumed, 2)
            finally:
                resumed.close()
            for (xa, ya), (xb, yb) in zip(expected, got):
                assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    finally:
        threaded.close()


def test_closing_rewinds_to_the_first_batch_not_handed_out():
    cases = [_case()]
    threaded = PatchSampler(cases, (16, 16, 16), 1, rank_generator(2), Augmenter(), threads=2)
    first = threaded.sample()
    threaded.close()
    assert threaded.drawn == 1 and not threaded._pending
    second = threaded.sample()  # works again after close, in the same stream
    threaded.close()
    plain = PatchSampler(cases, (16, 16, 16), 1, rank_generator(2), Augmenter())
    assert np.array_equal(plain.sample()[0], first[0]) and np.array_equal(plain.sample()[0], second[0])


def test_negative_loader_threads_are_refused():
    with pytest.raises(Exception, match="loader threads"):
        PatchSampler([_case()], (16, 16, 16), 1, rank_generator(0), threads=-1)


# --------------------------------------------------------------------------- lesion-balanced centres


def _three_lesions():
    """One class with three 26-connected lesions: a 10^3 cube, a lone voxel, and two voxels that
    touch only at a corner (one lesion for 26-connectivity, two for 6)."""
    label = np.zeros((40, 40, 40), np.uint8)
    label[5:15, 5:15, 5:15] = 1
    label[30, 30, 30] = 1
    label[30, 5, 30] = label[31, 6, 31] = 1
    return CaseData("three", np.random.default_rng(1).normal(size=(2, 40, 40, 40)).astype(np.float32), label)


def _centre_shares(fraction, n=3000):
    case = _three_lesions()
    s = PatchSampler([case], (8, 8, 8), 1, rank_generator(6), component_fraction=fraction)
    centres = [tuple(int(v) for v in s._centre(case, True)) for _ in range(n)]
    cube = np.mean([all(5 <= v < 15 for v in c) for c in centres])
    lone = np.mean([c == (30, 30, 30) for c in centres])
    pair = np.mean([c in ((30, 5, 30), (31, 6, 31)) for c in centres])
    return cube, lone, pair


def test_components_partition_the_class_into_26_connected_lesions():
    case = _three_lesions()
    idx, starts = case.components[1]
    assert np.array_equal(np.sort(idx), np.flatnonzero(case.label == 1))
    assert sorted(np.diff(starts).tolist()) == [1, 2, 1000]
    for k in range(3):  # each group is one lesion: its voxels lie within one of the three
        zyx = np.array(np.unravel_index(idx[starts[k]:starts[k + 1]], case.label.shape)).T
        assert (zyx.max(0) - zyx.min(0)).max() in (0, 1, 9)


def test_component_sampling_centres_every_lesion_equally_often_whatever_its_size():
    cube, lone, pair = _centre_shares(1.0)
    assert cube == pytest.approx(1 / 3, abs=0.04) and lone == pytest.approx(1 / 3, abs=0.04)
    assert pair == pytest.approx(1 / 3, abs=0.04)
    # voxel sampling (nnU-Net's, the default) centres the lone voxel once in 1003 draws
    cube, lone, pair = _centre_shares(0.0)
    assert cube > 0.99 and lone < 0.005
    # half and half
    cube, lone, _ = _centre_shares(0.5)
    assert lone == pytest.approx(0.5 / 3 + 0.5 / 1003, abs=0.03)
    assert cube == pytest.approx(0.5 / 3 + 0.5 * 1000 / 1003, abs=0.03)


def test_component_sampling_state_restores_the_same_patch_stream():
    cases = [_case(), _case("d", lesion=((2, 9), (30, 40), (5, 12))), _three_lesions()]
    a = PatchSampler(cases, (16, 16, 16), 2, rank_generator(3), Augmenter(), component_fraction=0.5)
    _stream(a, 3)
    state = a.state_dict()
    expected = _stream(a, 3)
    b = PatchSampler(cases, (16, 16, 16), 2, rank_generator(99), Augmenter(), component_fraction=0.5)
    b.load_state_dict(state)
    for (xa, ya), (xb, yb) in zip(expected, _stream(b, 3)):
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)


@pytest.mark.parametrize("fraction", [-0.1, 1.5])
def test_component_fractions_outside_0_1_are_refused(fraction):
    from VeloxSegLib.train.trainer import TrainConfig

    with pytest.raises(Exception, match="component-sampling fraction"):
        PatchSampler([_case()], (16, 16, 16), 1, rank_generator(0), component_fraction=fraction)
    with pytest.raises(Exception, match="--component-sampling must be in"):
        TrainConfig(component_sampling=fraction).check()
