"""The panel's state survives a scene save (commit to .mrml) and a re-import."""
import numpy as np
from logic_helpers import ijk_to_ras_matrix

from VeloxSegLogic import segmentation as S
from VeloxSegLogic import volumes as V
from VeloxSegLogic.parameters import Parameters, get_parameter_node, paths_from_text, paths_to_text


def test_parameter_node_is_a_module_singleton(scene):
    node = get_parameter_node(scene)
    assert get_parameter_node(scene) is node
    assert node.GetModuleName() == "VeloxSeg" and node.GetSingletonTag() == "VeloxSeg"


def test_parameters_restore_after_scene_commit_and_import(scene, tmp_path):
    import slicer

    ct = V.add_volume_from_array(scene, np.zeros((3, 4, 5), np.float32), ijk_to_ras_matrix((1, 1, 2), (0, 0, 0)), "CT")
    pet = V.add_volume_from_array(scene, np.zeros((3, 4, 5), np.float32), ijk_to_ras_matrix((1, 1, 2), (0, 0, 0)), "PET")
    seg = S.create_segmentation_node(scene, "truth", ct)
    for node in (ct, pet):  # give the volumes files so the scene can be reloaded
        storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storage.SetFileName(str(tmp_path / f"{node.GetName()}.nrrd"))
        storage.WriteData(node)
        node.SetAndObserveStorageNodeID(storage.GetID())
    params = Parameters(get_parameter_node(scene))
    params.model = "petct-lesion-demo"
    params.ensemble_with = [str(tmp_path / "fold 1, coarse"), str(tmp_path / "fold2.zip")]
    params.device = "cpu"
    params.overlap = 0.5
    params.tta = True
    params.bf16 = True
    params.pet_refine = False
    params.epochs = 7
    params.learning_rate = 3e-4
    params.new_model_name = "my-lesions"
    params.set_input_node(0, ct)
    params.set_input_node(1, pet)
    params.output_segmentation = seg
    params.set_cases([([ct, pet], seg)])

    scene.SetURL(str(tmp_path / "scene.mrml"))
    assert scene.Commit()
    scene.Clear(1)
    assert get_parameter_node(scene, create=False) is None

    scene.SetURL(str(tmp_path / "scene.mrml"))
    scene.Import()
    node = get_parameter_node(scene, create=False)
    assert node is not None
    restored = Parameters(node)
    assert (restored.model, restored.device, restored.overlap, restored.tta) == ("petct-lesion-demo", "cpu", 0.5, True)
    assert restored.bf16 is True and restored.pet_refine is False
    assert restored.ensemble_with == [str(tmp_path / "fold 1, coarse"), str(tmp_path / "fold2.zip")]
    assert (restored.epochs, restored.learning_rate, restored.new_model_name) == (7, 3e-4, "my-lesions")
    assert restored.input_node(0).GetName() == "CT" and restored.input_node(1).GetName() == "PET"
    assert isinstance(restored.output_segmentation, slicer.vtkMRMLSegmentationNode)
    [(volumes, segmentation)] = restored.cases()
    assert [v.GetName() for v in volumes] == ["CT", "PET"] and segmentation.GetName() == "truth"


def test_defaults_fill_a_fresh_node(scene):
    params = Parameters(get_parameter_node(scene))
    assert params.device == "auto" and params.overlap is None and params.tta is False and params.bf16 is False
    assert params.pet_refine is True  # the model's own setting
    assert params.ensemble_with == []  # one model
    params.node.SetParameter("EnsembleWith", "not json")  # an edited scene file: no ensemble, no crash
    assert params.ensemble_with == []
    params.set_cases([])
    assert params.cases() == []


def test_saved_path_lists_round_trip_and_unreadable_text_reads_as_none():
    """The text the panel and the Segment Editor effect save their 'Ensemble with' models as."""
    paths = ["/models/fold 1, coarse", "C:\\Users\\me\\fold2.zip", "/models/\u00e9t\u00e9"]
    assert paths_from_text(paths_to_text(paths)) == paths
    assert paths_from_text(paths_to_text([])) == []
    for text in ("", "not json", "{\"a\": 1}", "\"/one/path\"", "null"):
        assert paths_from_text(text) == [], text
    assert paths_from_text('["/a", 3, "", null, "/b"]') == ["/a", "/b"]  # only non-empty strings
