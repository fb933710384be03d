"""The Slicer self-test's flow on slicer-core: a generated phantom, loaded through storage nodes,
segmented with the embedded demo bundle through the panel's logic (subprocess and in-process)."""
import pytest

from VeloxSegLogic import VeloxSegCoreLogic
from VeloxSegLogic.selftest import demo_phantom_dice


@pytest.mark.parametrize("in_process", [False, True])
def test_demo_model_segments_the_generated_phantom_lesion(session, scene, in_process):
    dice, node, ct = demo_phantom_dice(VeloxSegCoreLogic(session), in_process=in_process)
    assert dice > 0.15  # the same bar as the Slicer self-test
    assert node.GetSegmentation().GetNumberOfSegments() == 1
