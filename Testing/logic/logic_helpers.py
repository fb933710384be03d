"""Shared helpers of the MRML logic tests (paths, geometry, bundle metadata)."""
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXTENSION = os.path.join(ROOT, "VeloxSegExtension")
HELPERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers")
for _path in (ROOT, EXTENSION):
    if _path not in sys.path:
        sys.path.insert(0, _path)


def rotation(ax_deg, ay_deg, az_deg):
    ax, ay, az = np.radians([ax_deg, ay_deg, az_deg])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def ijk_to_ras_matrix(spacing, origin, angles=(0, 0, 0)):
    matrix = np.eye(4)
    matrix[:3, :3] = rotation(*angles) @ np.diag(spacing)
    matrix[:3, 3] = origin
    return matrix


def ras_grid_points(matrix, shape):
    """RAS coordinates of every voxel of an array of ``shape`` ([k, j, i]) under ``matrix``."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    ijk = np.stack([i, j, k, np.ones_like(i)], axis=-1).reshape(-1, 4).T
    return (matrix @ ijk)[:3].T.reshape(shape + (3,))


def phantom_function(ras):
    """A smooth function of physical position (RAS mm), so resampling is checkable."""
    r, a, s = ras[..., 0], ras[..., 1], ras[..., 2]
    return (100.0 + 2.0 * r - 1.5 * a + 0.5 * s).astype(np.float32)


def labels_meta():
    return [
        {"value": 0, "name": "background"},
        {"value": 1, "name": "lesion", "color": [230, 80, 60],
         "terminology": {"category": ["SCT", "49755003", "Morphologically Altered Structure"],
                         "type": ["SCT", "108369006", "Neoplasm"]}},
        {"value": 2, "name": "liver", "color": [221, 130, 101]},
        {"value": 3, "name": "kidney", "color": [185, 102, 83]},
    ]


def bundle_json(name="petct-test", channels=("CT", "PET"), labels=None):
    return {
        "format_version": 1,
        "name": name,
        "description": "test bundle (metadata only)",
        "model": {"name": "veloxseg-b", "in_channels": [1] * len(channels), "num_classes": len(labels or labels_meta()),
                  "patch_size": [32, 32, 32], "overrides": {}},
        "spacing": [2.0, 2.0, 2.0],
        "channels": [{"name": c, "modality": c, "normalization": {"scheme": "none"}} for c in channels],
        "labels": labels or labels_meta(),
        "inference": {"overlap": 0.25, "blending": "uniform", "tta": False, "min_component_mm3": 0.0, "crop_to_body": True},
        "training": {"dataset": "", "epochs": 0, "seed": 0, "command": "", "metrics": {}, "parent": None},
    }


def random_bundle(folder, seed=0, spacing=(3.0, 3.0, 3.0), labels=None):
    """A veloxseg-b bundle with random weights at the smallest patch VeloxSeg tiles (64x32x32; 32^3 is
    refused by the paired windows), or skip if the library cannot make one yet."""
    try:
        from VeloxSegLib.bundle import save_bundle
        from VeloxSegLib.infer.pipeline import predict_case  # noqa: F401
        from VeloxSegLib.model import build_model
    except ImportError as exc:
        import pytest

        pytest.skip(f"VeloxSegLib cannot build/save a bundle yet ({exc})")
    import torch

    torch.manual_seed(seed)
    labels = labels or [{"value": 0, "name": "background"},
                        {"value": 1, "name": "lesion", "color": [230, 80, 60],
                         "terminology": {"category": ["SCT", "49755003", "Morphologically Altered Structure"],
                                         "type": ["SCT", "108369006", "Neoplasm"]}}]
    meta = bundle_json("batch-random", labels=labels)
    meta["channels"] = [
        {"name": "CT", "modality": "CT", "normalization": {"scheme": "ct", "clip": [-1000.0, 600.0], "mean": 40.0, "std": 200.0}},
        {"name": "PET", "modality": "PET", "normalization": {"scheme": "pet_zscore_body"}},
    ]
    meta["spacing"] = [float(s) for s in spacing]
    meta["model"]["patch_size"] = [64, 32, 32]
    model = build_model("veloxseg-b", in_channels=(1, 1), num_classes=2, patch_size=(64, 32, 32))
    return save_bundle(folder, meta, model.state_dict())
