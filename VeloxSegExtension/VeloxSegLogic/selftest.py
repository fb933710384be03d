"""The whole-flow check shared by the Slicer self-test and the slicer-core test suite: generate a
PET/CT phantom, load it through storage nodes, segment it with an embedded demo bundle through the
panel's logic and measure the lesion Dice against the phantom's truth."""
import os
import tempfile

DEMO_SEED = 20261123  # the held-out seed `veloxseg demo` uses (never seen in training)


def demo_phantom_dice(logic, bundle="petct-lesion-demo", seed=DEMO_SEED, case=0, in_process=False,
                      timeout=900):
    """Returns (dice, segmentation node, CT node). Heavy imports happen here, not at load."""
    import numpy as np
    import SimpleITK as sitk

    from VeloxSegLib.data.phantom import generate_petct_case

    from .logic import SegmentationRequest
    from .segmentation import segment_array
    from .volumes import read_volume

    ct, pet, truth, _info = generate_petct_case(seed, case)
    with tempfile.TemporaryDirectory(prefix="veloxseg-selftest-") as folder:
        paths = [os.path.join(folder, f"phantom_{name}.nii.gz") for name in ("CT", "PET", "truth")]
        for image, path in zip((ct, pet, truth), paths):
            sitk.WriteImage(image, path)
        ct_node = read_volume(paths[0], logic.scene, name="phantom CT")
        pet_node = read_volume(paths[1], logic.scene, name="phantom PET")
    info = logic.bundle_info(bundle)
    node = logic.segment(SegmentationRequest(bundle=info.path, input_nodes=[ct_node, pet_node], device="cpu"),
                         in_process=in_process, timeout=timeout)
    lesion_name = next(str(lab["name"]) for lab in info.labels if int(lab["value"]) == 1)
    segment_id = node.GetSegmentation().GetSegmentIdBySegmentName(lesion_name)
    predicted = segment_array(node, segment_id, ct_node) > 0
    reference = sitk.GetArrayFromImage(truth) > 0
    dice = 2.0 * np.logical_and(predicted, reference).sum() / max(1, predicted.sum() + reference.sum())
    return float(dice), node, ct_node
