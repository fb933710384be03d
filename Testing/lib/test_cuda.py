"""The GPU paths: the network, inference (float16 autocast) and training (AMP) on CUDA.

Skipped where torch sees no CUDA device (CI has none); run on a GPU machine with
``python -m pytest Testing/lib/test_cuda.py``.
"""
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from VeloxSegLib import build_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def exact_fp32():
    """Plain float32 on the GPU (no TF32), so CPU and GPU compute the same function to rounding."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("name,in_channels,classes", [("veloxseg-b", (1, 1), 2), ("veloxseg-s", (4,), 4),
                                                      ("lightmedseg", (4,), 4)])
def test_gpu_network_computes_the_cpu_function(exact_fp32, name, in_channels, classes):
    torch.manual_seed(0)
    net = build_model(name, in_channels=in_channels, num_classes=classes, patch_size=(96, 96, 96)).eval()
    x = torch.randn(2, sum(in_channels), 96, 96, 96)
    with torch.no_grad():
        cpu = net(x)
        gpu = net.cuda()(x.cuda()).cpu()
    assert gpu.shape == cpu.shape == (2, classes, 96, 96, 96)
    scale = cpu.abs().max().item()
    assert (gpu - cpu).abs().max().item() <= 1e-4 * max(scale, 1.0)


def test_amp_training_step_reaches_every_parameter_with_finite_gradients():
    from VeloxSegLib.losses import LossConfig, VeloxSegLoss

    torch.manual_seed(0)
    net = build_model("veloxseg-b", in_channels=(1, 1), num_classes=2, patch_size=(96, 96, 96)).cuda().train()
    loss_fn = VeloxSegLoss(LossConfig())
    x = torch.randn(2, 2, 96, 96, 96, device="cuda")
    y = (x[:, 1] > 1.5).long()
    scaler = torch.amp.GradScaler("cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        out = net.forward_train(x)
    loss, parts = loss_fn(out, y, x)
    assert np.isfinite(parts["total"])
    scaler.scale(loss).backward()
    scaler.unscale_(torch.optim.SGD(net.parameters(), lr=0.0))
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert not missing
    bad = [n for n, p in net.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad


def test_cpu_training_path_computes_the_gpu_function_in_loss_and_gradients(exact_fp32):
    """The CPU's training shortcuts (channels-last JL convolutions, GEMM patch embeddings and 1x1
    convolutions, separable deep-supervision upsampling) against the plain modules on the GPU."""
    from VeloxSegLib.losses import VeloxSegLoss

    torch.manual_seed(0)
    net = build_model("veloxseg-b", in_channels=(1, 1), num_classes=2, patch_size=(96, 96, 96),
                      conv_drop=0.0, attn_drop=0.0, proj_drop=0.0).train()
    x = torch.randn(2, 2, 96, 96, 96)
    y = (x[:, 1] > 1.5).long()
    results = []
    for device in ("cpu", "cuda"):
        net.to(device).zero_grad(set_to_none=True)
        loss, _ = VeloxSegLoss()(net.forward_train(x.to(device)), y.to(device), x.to(device))
        loss.backward()
        results.append((loss.item(), {n: p.grad.detach().cpu().clone() for n, p in net.named_parameters()}))
    (cpu_loss, cpu_grads), (gpu_loss, gpu_grads) = results
    assert abs(cpu_loss - gpu_loss) <= 1e-4 * abs(gpu_loss)
    for name, g in gpu_grads.items():
        assert (cpu_grads[name] - g).abs().max() <= 1e-3 * g.abs().max() + 1e-7, name


def _phantom(tmp_path, n=1, seed=901):
    from VeloxSegLib.data.phantom import write_phantom_dataset

    root = tmp_path / f"ds{seed}"
    write_phantom_dataset(root, "petct", n, seed=seed)
    return root


def test_gpu_inference_with_the_embedded_bundle_agrees_with_the_cpu(tmp_path):
    from VeloxSegLib.infer.pipeline import Segmenter
    from VeloxSegLib.metrics import dice_score

    root = _phantom(tmp_path)
    inputs = [root / "imagesTr" / "petct_0000_0000.nii.gz", root / "imagesTr" / "petct_0000_0001.nii.gz"]
    cpu = sitk.GetArrayFromImage(Segmenter("petct-lesion-demo", device="cpu").predict(inputs).labels)
    gpu_seg = Segmenter("petct-lesion-demo", device="cuda")
    assert next(gpu_seg.model.parameters()).is_cuda
    gpu = sitk.GetArrayFromImage(gpu_seg.predict(inputs).labels)
    assert gpu.shape == cpu.shape and cpu.sum() > 0
    # float16 autocast on the GPU against float32 on the CPU: the same lesions, to a few border voxels
    assert dice_score(gpu == 1, cpu == 1) >= 0.97
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "labelsTr" / "petct_0000.nii.gz")))
    assert abs(dice_score(gpu == 1, truth == 1) - dice_score(cpu == 1, truth == 1)) <= 0.02


def test_training_on_the_gpu_with_amp_and_loader_threads_writes_a_usable_bundle(tmp_path):
    from VeloxSegLib.bundle import load_bundle
    from VeloxSegLib.train.trainer import TrainConfig, run_training

    ds = _phantom(tmp_path, n=3, seed=11)
    cfg = TrainConfig(epochs=2, iterations_per_epoch=4, batch_size=2, val_every=1, device="cuda", seed=1,
                      loader_threads=3, final_weights="last")
    result = run_training(ds, tmp_path / "gpu-bundle", cfg)
    assert all(np.isfinite(r["loss"]["total"]) for r in result.history)
    assert next(result.model.parameters()).is_cuda
    bundle = load_bundle(tmp_path / "gpu-bundle")
    assert bundle.meta["training"]["metrics"]["weights"] == "last"
    net = bundle.build_model("cpu")  # a bundle trained on the GPU loads and runs on the CPU
    with torch.no_grad():
        out = net(torch.zeros(1, 2, *bundle.meta["model"]["patch_size"]))
    assert out.shape[1] == 2 and torch.isfinite(out).all()
