"""The CPU fast-path kernels against PyTorch's own operators (the plain path's building blocks)."""
import pytest
import torch
import torch.nn.functional as F

from VeloxSegLib.model import fastops


@pytest.mark.parametrize("size", [(2, 2, 2), (4, 4, 4), (8, 8, 8), (1, 2, 4), (2, 1, 1), (1, 1, 2), (4, 2, 1)])
def test_separable_max_pool_equals_max_pool3d_on_channel_slices(size):
    torch.manual_seed(0)
    full = torch.randn(2, 7, 16, 24, 8)
    x = full[:, 2:5]  # a channel slice, as the window pairs pool their own channel groups
    assert torch.equal(fastops.max_pool_separable(x, size), F.max_pool3d(x, size, size))


def _base2_attention(q, k, v, bias, **kw):
    """fastops.windowed_attention fed as the PWA fast path feeds it: q and bias in log2 units,
    v transposed with a row of ones."""
    v1_t = torch.cat([v.transpose(-1, -2), torch.ones_like(v[..., :1]).transpose(-1, -2)], dim=-2)
    return fastops.windowed_attention(q * fastops.LOG2E, k, v1_t.contiguous(), bias * fastops.LOG2E, **kw)


@pytest.mark.parametrize("heads,windows,tokens,dq,dv", [(1, 37, 54, 4, 4), (2, 3, 432, 8, 8), (2, 5, 16, 4, 12)])
def test_windowed_attention_returns_the_transposed_softmax_product(heads, windows, tokens, dq, dv):
    torch.manual_seed(1)
    q = torch.randn(2, heads, windows, tokens, dq)
    k = torch.randn(2, heads, windows, tokens, dq)
    v = torch.randn(2, heads, windows, tokens, dv)
    bias = torch.randn(heads, tokens, tokens)
    ref = torch.softmax(q @ k.transpose(-1, -2) + bias[None, :, None], dim=-1) @ v
    out = _base2_attention(q, k, v, bias, chunk_elems=3 * tokens * tokens)
    assert out.shape == (2, heads, windows, dv, tokens)
    torch.testing.assert_close(out.transpose(-1, -2), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("offset", [200.0, -400.0])
def test_windowed_attention_survives_scores_that_overflow_or_underflow_without_the_max(offset):
    """Skipping the max subtraction is only safe while 2^scores stays a normal float: chunks
    with huge or hugely negative scores (here a constant offset, which softmax ignores) must take
    the max-subtracted route and still give the exact result, not inf or NaN."""
    torch.manual_seed(4)
    q = torch.randn(1, 1, 6, 27, 4)
    k = torch.randn(1, 1, 6, 27, 4)
    v = torch.randn(1, 1, 6, 27, 4)
    shifted = torch.randn(1, 27, 27) + offset
    ref = torch.softmax(q @ k.transpose(-1, -2) + shifted[None, :, None], dim=-1) @ v
    out = _base2_attention(q, k, v, shifted, chunk_elems=2 * 27 * 27)  # 3 chunks
    assert torch.isfinite(out).all()
    # scores of a few hundred carry float32 rounding of ~3e-5 (in either base), hence 1e-4
    torch.testing.assert_close(out.transpose(-1, -2), ref, rtol=1e-4, atol=1e-4)


def test_conv3x3_gemm_equals_conv3d():
    torch.manual_seed(2)
    x = torch.randn(2, 5, 6, 7, 8)
    w = torch.randn(9, 5, 3, 3, 3)
    b = torch.randn(9)
    torch.testing.assert_close(fastops.conv3x3_gemm(x, w, b, fastops.conv3x3_weight(w)),
                               F.conv3d(x, w, b, padding=1), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(fastops.conv3x3_gemm(x, w, None), F.conv3d(x, w, None, padding=1),
                               rtol=1e-5, atol=1e-4)


def test_strided_im2col_conv_equals_conv3d():
    torch.manual_seed(3)
    x = torch.randn(2, 4, 8, 6, 10)
    w = torch.randn(6, 4, 3, 3, 3)
    b = torch.randn(6)
    torch.testing.assert_close(fastops.conv3d_im2col(x, w, b, 2, 1), F.conv3d(x, w, b, stride=2, padding=1),
                               rtol=1e-5, atol=1e-4)


def test_trilinear_matrix_matches_interpolate_align_corners():
    torch.manual_seed(4)
    t = torch.randn(3, 1, 5)
    a = fastops.interp_matrix(5, 12, t.dtype, t.device)
    ref = F.interpolate(t, size=12, mode="linear", align_corners=True)
    torch.testing.assert_close((a @ t[:, 0, :, None])[..., 0], ref[:, 0], rtol=1e-6, atol=1e-6)


def _shuffle_head_case(seed, batch, cin, classes, size, r):
    """Input, head weight and bias, and the float64 convolution + pixel shuffle they should give."""
    from VeloxSegLib.model.layers import pixel_shuffle_3d

    torch.manual_seed(seed)
    x = torch.randn(batch, cin, *size)
    w = torch.randn(classes * r ** 3, cin, 3, 3, 3) * 0.2
    b = torch.randn(classes * r ** 3)
    return x, w, b, pixel_shuffle_3d(F.conv3d(x.double(), w.double(), b.double(), padding=1), r)


@pytest.mark.parametrize("batch,cin,classes,size", [(1, 16, 2, (24, 24, 24)), (2, 4, 3, (3, 8, 5)), (1, 6, 1, (2, 4, 7))])
def test_winograd_shuffle_head_equals_conv3d_then_pixel_shuffle(batch, cin, classes, size):
    from VeloxSegLib.model.layers import pixel_shuffle_3d

    r = 4
    x, w, b, ref = _shuffle_head_case(5, batch, cin, classes, size, r)
    out = fastops.conv3x3_shuffle_winograd(x, fastops.winograd_head_weight(w), b, r)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    # within a few float32 roundings of the exact (float64) result, like the direct GEMM
    direct = pixel_shuffle_3d(fastops.conv3x3_gemm(x, w, b), r)
    err, err_direct = (out.double() - ref).abs().max().item(), (direct.double() - ref).abs().max().item()
    assert err < max(20 * err_direct, 1e-5) and err < 1e-4 * ref.abs().max().item()
    no_bias = fastops.conv3x3_shuffle_winograd(x, fastops.winograd_head_weight(w), None, r)
    torch.testing.assert_close(no_bias.double(), pixel_shuffle_3d(F.conv3d(x.double(), w.double(), None, padding=1), r),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(1, 16, 24, 24, 24), (2, 3, 8, 8, 8), (1, 4, 3, 3, 3)])
def test_instance_norm_equals_instance_norm3d(shape):
    torch.manual_seed(6)
    x = torch.randn(*shape) * 3 + 5  # an offset mean, where one-pass variance would lose digits
    norm = torch.nn.InstanceNorm3d(shape[1])
    torch.testing.assert_close(fastops.instance_norm(norm, x), norm(x), rtol=1e-5, atol=1e-5)
    affine = torch.nn.InstanceNorm3d(shape[1], affine=True)  # not handled: runs as itself
    with torch.no_grad():
        affine.weight.uniform_(0.5, 2.0)
    assert torch.equal(fastops.instance_norm(affine, x), affine(x))


def test_workspace_is_reused_per_shape_and_kept_apart_per_thread():
    import threading

    owner = torch.nn.Module()
    like = torch.zeros(1)
    a = fastops.workspace(owner, "slab", (2, 3), like)
    assert fastops.workspace(owner, "slab", (2, 3), like) is a
    assert fastops.workspace(owner, "slab", (3, 3), like).shape == (3, 3)  # a new shape replaces it
    seen = []
    t = threading.Thread(target=lambda: seen.append(fastops.workspace(owner, "slab", (3, 3), like)))
    t.start()
    t.join()
    assert seen[0] is not fastops.workspace(owner, "slab", (3, 3), like)


def test_shuffle_width_first_puts_the_width_sub_position_outermost():
    r, k = 3, 2
    idx = torch.arange(k * r ** 3)  # pixel-shuffle order: c = ((k r + s1) r + s2) r + s3
    got = fastops.shuffle_width_first(idx, r)
    for s3 in range(r):
        for kk in range(k):
            for s1 in range(r):
                for s2 in range(r):
                    assert got[((s3 * k + kk) * r + s1) * r + s2] == ((kk * r + s1) * r + s2) * r + s3
    w = torch.randn(5, k * r ** 3, 4)  # any axis
    torch.testing.assert_close(fastops.shuffle_width_first(w, r, dim=1), w[:, got], rtol=0, atol=0)


def test_head_gives_the_same_numbers_with_the_numpy_and_the_torch_copy(monkeypatch):
    from VeloxSegLib.model.layers import ShuffleHead

    torch.manual_seed(8)
    head = ShuffleHead(6, 3, 4).eval()
    torch.nn.init.normal_(head.conv.bias)
    x = torch.randn(2, 6, 6, 8, 5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.inference_mode():
            monkeypatch.setattr(fastops, "NUMPY_COPY", True)
            calls = []
            real_copyto = fastops.np.copyto
            monkeypatch.setattr(fastops.np, "copyto", lambda *a: calls.append(1) or real_copyto(*a))
            via_numpy = head(x)
            assert calls  # the numpy copy did run
            monkeypatch.setattr(fastops, "NUMPY_COPY", False)
            via_torch = head(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(via_numpy, via_torch)
    torch.testing.assert_close(via_numpy, head(x), rtol=1e-4, atol=1e-4)  # the plain module


@pytest.mark.parametrize("bias", [True, False])
def test_conv1x1_shuffle_equals_the_transposed_convolution_it_replaces(bias):
    torch.manual_seed(13)
    x = torch.randn(2, 6, 3, 4, 5)
    w = torch.randn(6, 5, 2, 2, 2)  # ConvTranspose3d(6, 5, 2, stride=2) weight
    b = torch.randn(5) if bias else None
    ref = F.conv_transpose3d(x.double(), w.double(), None if b is None else b.double(), stride=2)
    wt = fastops.shuffle_width_first(w.reshape(6, -1), 2, dim=1).contiguous()
    bt = None if b is None else fastops.shuffle_width_first(b.repeat_interleave(8), 2)
    for threads in (1, 2):  # numpy's copy on one thread, PyTorch's on two
        before = torch.get_num_threads()
        try:
            torch.set_num_threads(threads)
            with torch.inference_mode():
                out = fastops.conv1x1_shuffle(x, wt, bt, 2)
        finally:
            torch.set_num_threads(before)
        assert out.shape == ref.shape and out.is_contiguous()
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_head_gives_identical_results_when_called_again_with_its_reused_buffers():
    from VeloxSegLib.model.layers import ShuffleHead

    torch.manual_seed(7)
    head = ShuffleHead(8, 2, 4).eval()
    x1, x2 = torch.randn(1, 8, 8, 8, 8), torch.randn(2, 8, 8, 8, 8)
    with torch.inference_mode():
        first = head(x1)
        head(x2)  # another input through the same scratch buffers
        again = head(x1)
    assert torch.equal(first, again)


@pytest.mark.parametrize("kind,chunk_elems,depth,seed", [
    # height-only: chunks of 1 depth slice, of 3 slices (7 = 3 + 3 + 1: a ragged last chunk), all at once
    ("winograd", 1, 7, 8), ("winograd", 3 * 6 * 128 * 2 * 5, 7, 8), ("winograd", 1 << 30, 7, 8),
    # depth and height: one depth tile at a time, two (3 tiles = 2 + 1: ragged), all at once
    ("winograd2d", 1, 6, 10), ("winograd2d", 24 * 128 * 2 * 5 * 2, 6, 10), ("winograd2d", 1 << 30, 6, 10)])
def test_winograd_heads_give_the_same_numbers_whatever_depth_chunks_they_go_over(kind, chunk_elems, depth, seed):
    """The same sums whatever the chunking, up to the BLAS kernel's summation order for another
    GEMM width."""
    head = getattr(fastops, f"conv3x3_shuffle_{kind}")
    torch.manual_seed(seed)
    x = torch.randn(2, 5, depth, 8, 5)
    w = torch.randn(128, 5, 3, 3, 3) * 0.2
    b = torch.randn(128)
    wp = fastops.winograd2d_head_weight(w, 4) if kind == "winograd2d" else fastops.winograd_head_weight(w)
    whole = head(x, wp, b, 4, chunk_elems=1 << 30)
    torch.testing.assert_close(head(x, wp, b, 4, chunk_elems=chunk_elems), whole, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("channels,groups,k,size", [(16, 4, 5, 12), (16, 4, 3, 12), (32, 4, 5, 6), (8, 1, 3, 5)])
@pytest.mark.parametrize("channels_last", [True, False])
def test_grouped_conv_in_either_layout_equals_the_module_and_returns_a_contiguous_tensor(
        channels, groups, k, size, channels_last):
    torch.manual_seed(3)
    conv = torch.nn.Conv3d(channels, channels, k, padding=k // 2, groups=groups)
    x = torch.randn(2, channels, size, size + 1, size - 1)
    with torch.inference_mode():
        y = fastops.grouped_conv(conv, x, channels_last=channels_last)
        torch.testing.assert_close(y, conv(x), atol=1e-4, rtol=1e-4)
    assert y.is_contiguous()


@pytest.mark.parametrize("avx2", [True, False])
def test_grouped_conv_goes_channels_last_by_default_only_on_avx2_and_large_grids(avx2, monkeypatch):
    monkeypatch.setattr(fastops, "grouped_conv_channels_last_default", lambda: avx2)
    layouts = []
    real = torch.Tensor.contiguous
    monkeypatch.setattr(torch.Tensor, "contiguous", lambda t, memory_format=torch.contiguous_format: layouts.append(
        memory_format) or real(t, memory_format=memory_format))
    conv = torch.nn.Conv3d(8, 8, 3, padding=1, groups=2)
    n = fastops.CHANNELS_LAST_MIN_SIZE
    with torch.inference_mode():
        for size in ((n, n, n), (n, n - 1, n + 1)):
            layouts.clear()
            x = torch.randn(1, 8, *size)
            torch.testing.assert_close(fastops.grouped_conv(conv, x), conv(x), atol=1e-4, rtol=1e-4)
            went_channels_last = torch.channels_last_3d in layouts
            assert went_channels_last == (avx2 and min(size) >= n)


def test_grouped_conv_layout_default_follows_the_cpu_capability(monkeypatch):
    fastops.grouped_conv_channels_last_default.cache_clear()
    try:
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
        assert fastops.grouped_conv_channels_last_default() is True
        fastops.grouped_conv_channels_last_default.cache_clear()
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
        assert fastops.grouped_conv_channels_last_default() is False
    finally:
        fastops.grouped_conv_channels_last_default.cache_clear()


@pytest.mark.parametrize("channels,out_per_group,groups,kernels,size,bias", [
    (16, 4, 4, (3, 5), (12, 13, 11), True),   # JLConv's 3^3 and 5^3 branches, non-cubic grid
    (32, 4, 8, (3, 5), (12, 12, 12), False),
    (8, 8, 2, (5,), (5, 7, 9), True),         # odd sizes, one kernel (preset S)
    (4, 3, 4, (3,), (6, 4, 5), True),         # depthwise with 3 outputs per group
])
def test_grouped_conv_fft_equals_the_direct_convolutions(channels, out_per_group, groups, kernels, size, bias):
    torch.manual_seed(4)
    convs = [torch.nn.Conv3d(channels, out_per_group * groups, k, padding=k // 2, groups=groups, bias=bias)
             for k in kernels]
    x = torch.randn(2, channels, *size)
    with torch.inference_mode():
        ys = fastops.grouped_conv_fft(x, convs)
        assert len(ys) == len(convs)
        for conv, y in zip(convs, ys):
            assert y.is_contiguous() and y.shape == (2, out_per_group * groups, *size)
            torch.testing.assert_close(y, conv(x), atol=1e-5, rtol=1e-4)


def test_grouped_conv_fft_uses_the_spectra_it_is_given():
    torch.manual_seed(5)
    conv = torch.nn.Conv3d(8, 8, 3, padding=1, groups=2)
    x = torch.randn(1, 8, 6, 6, 6)
    sizes = []

    def spectrum(size):
        sizes.append(tuple(size))
        return fastops.fft_kernel_spectrum(conv, size)

    with torch.inference_mode():
        (y,) = fastops.grouped_conv_fft(x, [conv], [spectrum])
        torch.testing.assert_close(y, conv(x), atol=1e-5, rtol=1e-4)
        # a wrong spectrum gives a wrong answer: the result really comes from it
        (z,) = fastops.grouped_conv_fft(x, [conv], [lambda size: 2 * fastops.fft_kernel_spectrum(conv, size)])
        bias = conv.bias.view(1, -1, 1, 1, 1)
        torch.testing.assert_close(z - bias, 2 * (y - bias), atol=1e-5, rtol=1e-4)
    assert sizes == [(8, 8, 8)]  # the input padded by the kernel minus one


def test_fft_convolution_default_needs_avx2_float32_and_a_large_enough_grid(monkeypatch):
    monkeypatch.setattr(fastops, "grouped_conv_channels_last_default", lambda: True)
    n = fastops.FFT_CONV_MIN_SIZE
    assert fastops.fft_conv_default(torch.zeros(1, 4, n, n + 1, n + 2))
    assert not fastops.fft_conv_default(torch.zeros(1, 4, n, n - 1, n))
    assert not fastops.fft_conv_default(torch.zeros(1, 4, n, n, n, dtype=torch.bfloat16))
    monkeypatch.setattr(fastops, "grouped_conv_channels_last_default", lambda: False)
    assert not fastops.fft_conv_default(torch.zeros(1, 4, n, n, n))


@pytest.mark.parametrize("channels,out,kernel,size", [(1, 16, (4, 4, 4), (16, 12, 8)), (2, 8, (4, 4, 2), (8, 12, 6)),
                                                      (3, 5, (2, 2, 2), (4, 4, 4))])
def test_patchify_conv_equals_conv3d_in_values_and_every_gradient(channels, out, kernel, size):
    torch.manual_seed(6)
    conv = torch.nn.Conv3d(channels, out, kernel, stride=kernel)
    x = torch.randn(2, channels, *size, requires_grad=True)
    g = torch.randn(2, out, *[s // k for s, k in zip(size, kernel)])
    ref = conv(x)
    ref_grads = torch.autograd.grad(ref, (x, conv.weight, conv.bias), g)
    y = fastops.patchify_conv(x, conv.weight, conv.bias)
    assert y.is_contiguous() and y.shape == ref.shape
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(torch.autograd.grad(y, (x, conv.weight, conv.bias), g), ref_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    no_bias = fastops.patchify_conv(x, conv.weight)
    torch.testing.assert_close(no_bias, ref - conv.bias.view(1, -1, 1, 1, 1), atol=1e-5, rtol=1e-5)


def test_patchify_conv_refuses_a_grid_the_kernel_does_not_divide():
    with pytest.raises(ValueError, match="divisible"):
        fastops.patchify_conv(torch.zeros(1, 1, 8, 8, 6), torch.zeros(4, 1, 4, 4, 4))


@pytest.mark.parametrize("size,out", [((3, 3, 3), (96, 96, 96)), ((6, 4, 2), (24, 16, 8)), ((1, 5, 3), (4, 9, 7))])
def test_separable_trilinear_upsampling_equals_interpolate_in_values_and_gradient(size, out):
    torch.manual_seed(9)
    x = torch.randn(2, 3, *size, requires_grad=True)
    g = torch.randn(2, 3, *out)
    ref = F.interpolate(x, size=out, mode="trilinear", align_corners=True)
    y = fastops.upsample_trilinear(x, out)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    # each gradient entry sums up to 32^3 terms, so compare with float64 (F.interpolate's own
    # float32 backward is 1e-5 of the scale off at 3^3 -> 96^3; these products are 3e-7 off)
    x64 = x.detach().double().requires_grad_()
    want = torch.autograd.grad(F.interpolate(x64, size=out, mode="trilinear", align_corners=True), x64,
                               g.double())[0]
    got = torch.autograd.grad(y, x, g)[0]
    assert (got.double() - want).abs().max() <= 2e-6 * want.abs().max()


def test_interpolation_matrices_cached_in_inference_mode_still_work_with_autograd():
    """A validation (inference mode, fast path) may build a cached matrix first; the next training
    step's deep-supervision upsampling must still be able to save it for backward."""
    fastops.interp_matrix.cache_clear()
    fastops._interp_matrix_cpu.cache_clear()
    with torch.inference_mode():
        fastops.upsample_trilinear(torch.randn(1, 1, 5, 7, 3), (11, 13, 9))
    x = torch.randn(1, 1, 5, 7, 3, requires_grad=True)
    y = fastops.upsample_trilinear(x, (11, 13, 9))
    (g,) = torch.autograd.grad(y.sum(), x)
    ref = F.interpolate(x, size=(11, 13, 9), mode="trilinear", align_corners=True)
    torch.testing.assert_close(g, torch.autograd.grad(ref.sum(), x)[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("batch,cin,classes,size", [(1, 16, 2, (24, 24, 24)), (2, 4, 3, (6, 4, 5)),
                                                    (1, 6, 1, (2, 12, 2)), (1, 16, 2, (16, 32, 8))])
def test_winograd2d_shuffle_head_equals_conv3d_then_pixel_shuffle(batch, cin, classes, size):
    from VeloxSegLib.model.layers import pixel_shuffle_3d

    r = 4
    x, w, b, ref = _shuffle_head_case(9, batch, cin, classes, size, r)
    out = fastops.conv3x3_shuffle_winograd2d(x, fastops.winograd2d_head_weight(w, r), b, r)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    # F(2, 3) x F(4, 3) rounds like the height-only F(4, 3): a few float32 roundings of the exact result
    one_d = fastops.conv3x3_shuffle_winograd(x, fastops.winograd_head_weight(w), b, r)
    err, err_1d = (out.double() - ref).abs().max().item(), (one_d.double() - ref).abs().max().item()
    assert err < max(2 * err_1d, 1e-5) and err < 1e-5 * ref.abs().max().item()
    no_bias = fastops.conv3x3_shuffle_winograd2d(x, fastops.winograd2d_head_weight(w, r), None, r)
    torch.testing.assert_close(no_bias.double(), pixel_shuffle_3d(F.conv3d(x.double(), w.double(), None, padding=1), r),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size,path", [((24, 24, 24), "winograd2d"), ((5, 8, 8), "winograd"), ((6, 6, 8), "gemm")])
def test_shuffle_head_takes_the_cheapest_exact_path_its_input_allows(size, path):
    from VeloxSegLib.model.layers import ShuffleHead

    torch.manual_seed(11)
    head = ShuffleHead(8, 2, 4).eval()
    x = torch.randn(1, 8, *size)
    with torch.inference_mode():
        fast = head(x)
    plain = head(x)  # autograd on: the plain module
    assert set(head._fast_cache) == {path}
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_pointwise_adds_a_scaled_residual_and_can_accumulate_into_it(bias, scale):
    torch.manual_seed(12)
    x, w = torch.randn(2, 6, 3, 4, 5), torch.randn(7, 6)
    b = torch.randn(7) if bias else None
    res = torch.randn(2, 7, 3, 4, 5)
    ref = scale * res.double() + torch.einsum("oc,bcdhw->bodhw", w.double(), x.double())
    if bias:
        ref = ref + b.double().view(1, -1, 1, 1, 1)
    kept = res.clone()
    out = fastops.pointwise(x, w, b, residual=res, residual_scale=scale)
    assert torch.equal(res, kept) and out.data_ptr() != res.data_ptr()  # the residual is left alone
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    if scale == 1.0:  # accumulating into the residual: the same numbers, in its storage
        acc = fastops.pointwise(x, w, b, residual=res, overwrite_residual=True)
        assert acc.data_ptr() == res.data_ptr()
        torch.testing.assert_close(acc, out, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="out"):
        fastops.pointwise(x, w, b, residual=kept, out=torch.empty_like(kept))


def test_bias_before_a_plain_instance_norm_is_dropped_and_kept_before_any_other_norm():
    b = torch.randn(4)
    assert fastops.bias_before(torch.nn.InstanceNorm3d(4), b) is None
    assert fastops.bias_before(torch.nn.InstanceNorm3d(4, track_running_stats=True), b) is b
    assert fastops.bias_before(torch.nn.GroupNorm(2, 4), b) is b
    assert fastops.bias_before(torch.nn.Identity(), b) is b
    # the reason it may be dropped: the instance norm's output does not change
    x = torch.randn(2, 4, 5, 6, 7)
    norm = torch.nn.InstanceNorm3d(4)
    torch.testing.assert_close(norm(x + b.view(1, -1, 1, 1, 1) * 10), norm(x), rtol=1e-4, atol=1e-4)


def test_grouped_conv_fft_takes_the_biases_it_is_given():
    torch.manual_seed(13)
    x = torch.randn(1, 8, 12, 12, 12)
    convs = [torch.nn.Conv3d(8, 8, k, padding=k // 2, groups=2) for k in (3, 5)]
    with torch.no_grad():
        own = fastops.grouped_conv_fft(x, convs)
        none = fastops.grouped_conv_fft(x, convs, biases=[None, convs[1].bias])
        torch.testing.assert_close(none[0], F.conv3d(x, convs[0].weight, None, padding=1, groups=2),
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(none[1], own[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(own[0], convs[0](x), rtol=1e-4, atol=1e-4)
