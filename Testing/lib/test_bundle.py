"""Model bundles: strict validation, safe loading (no pickle, safe zips), atomic saving, discovery."""
import copy
import hashlib
import json
import pathlib
import pickle
import stat
import subprocess
import sys
import zipfile

import pytest
import torch

import VeloxSegLib
from VeloxSegLib import bundle as B
from VeloxSegLib.errors import BundleError, InputError

SCHEMA = pathlib.Path(B.__file__).parent / "schemas" / "bundle.schema.json"


def make_meta(**changes):
    meta = {
        "format_version": 1,
        "name": "petct-lesion-demo",
        "description": "test bundle",
        "model": {"name": "veloxseg-b", "in_channels": [1, 1], "num_classes": 2, "patch_size": [32, 32, 32],
                  "overrides": {}},
        "spacing": [2.0364, 2.0364, 3.0],
        "channels": [
            {"name": "CT", "modality": "CT",
             "normalization": {"scheme": "ct", "clip": [-1000.0, 600.0], "mean": 40.0, "std": 200.0}},
            {"name": "PET", "modality": "PET", "normalization": {"scheme": "pet_zscore_body"}},
        ],
        "labels": [
            {"value": 0, "name": "background"},
            {"value": 1, "name": "lesion", "color": [230, 80, 60],
             "terminology": {"category": ["SCT", "49755003", "Morphologically Altered Structure"],
                             "type": ["SCT", "108369006", "Neoplasm"]}},
        ],
        "inference": {"overlap": 0.25, "blending": "uniform", "tta": False, "min_component_mm3": 0.0,
                      "crop_to_body": True},
        "training": {"dataset": "synthetic", "epochs": 0, "seed": 0, "command": "pytest", "metrics": {},
                     "parent": None},
    }
    meta.update(changes)
    return meta


class Tiny(torch.nn.Module):
    """A plain module standing in for a network: 'teacher' is training-only."""

    training_only_prefixes = ("teacher.",)

    def __init__(self, in_channels=(1, 1), num_classes=2, patch_size=(32, 32, 32), width=4, with_teacher=True):
        super().__init__()
        self.conv = torch.nn.Conv3d(sum(in_channels), width, 3, padding=1)
        self.head = torch.nn.Conv3d(width, num_classes, 1)
        self.teacher = torch.nn.Conv3d(width, sum(in_channels), 1) if with_teacher else None

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)))


def tiny_state(**kw):
    torch.manual_seed(0)
    return Tiny(**kw).state_dict()


def digest(path):
    path = pathlib.Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def listing(folder):
    return sorted(p.name for p in pathlib.Path(folder).iterdir())


@pytest.fixture
def folder_bundle(tmp_path):
    return B.save_bundle(tmp_path / "demo", make_meta(), tiny_state())


# --------------------------------------------------------------------------- validation


def test_valid_meta_is_normalized_and_defaults_filled():
    meta = make_meta()
    del meta["inference"], meta["training"], meta["description"], meta["model"]["overrides"]
    out = B.validate_meta(meta, "bundle.json")
    assert out["inference"] == B.INFERENCE_DEFAULTS
    assert out["training"] == {} and out["description"] == "" and out["model"]["overrides"] == {}
    assert out is not meta and "inference" not in meta  # input untouched


def test_doc_example_validates():
    doc = (pathlib.Path(VeloxSegLib.__file__).parents[1] / "docs" / "bundle-format.md").read_text()
    block = doc.split("```json", 1)[1].split("```", 1)[0]
    meta = json.loads(block)
    assert B.validate_meta(meta)["name"] == "petct-lesion-demo"


def _set(meta, path, value):
    keys = path.replace("]", "").replace("[", ".").split(".")
    obj = meta
    for k in keys[:-1]:
        obj = obj[int(k)] if isinstance(obj, list) else obj[k]
    last = keys[-1]
    if value is _DELETE:
        del obj[last]
    elif isinstance(obj, list):
        obj[int(last)] = value
    else:
        obj[last] = value
    return meta


_DELETE = object()

BAD = [
    ("labels[1].color", [1, 2], "bundle.json: labels[1].color must be 3 integers 0..255"),
    ("labels[1].color", [0, 0, 256], "labels[1].color must be 3 integers 0..255"),
    ("labels[1].color", [True, 0, 0], "labels[1].color must be 3 integers"),
    ("labels[1].value", 2, "labels[1].value must be 1"),
    ("labels[1].name", "", "labels[1].name must be a non-empty string"),
    ("labels[1].name", "background", "labels[1].name 'background' is used by another label"),
    ("labels[1].terminology.type", ["SCT", "1"], "labels[1].terminology.type must have 3 entries"),
    ("labels[1].shape", "round", "labels[1].shape is not a known field"),
    ("name", _DELETE, "name is missing"),
    ("name", "../evil", "name must be 1-128 characters"),
    ("format_version", 2, "format_version is 2, newer than this VeloxSeg supports"),
    ("format_version", "1", "format_version must be an integer"),
    ("extra", 1, "extra is not a known field"),
    ("model.in_channels", [1], "model.in_channels must add up to the number of channels (2)"),
    ("model.in_channels", "2", "model.in_channels must be an array"),
    ("model.in_channels", [1, 1.5], "model.in_channels[1] must be an integer >= 1"),
    ("model.in_channels", [1, 0], "model.in_channels[1] must be an integer >= 1"),
    ("model.num_classes", 3, "labels must have model.num_classes (3) entries"),
    ("model.num_classes", True, "model.num_classes must be an integer >= 2"),
    ("model.patch_size", [32, 32], "model.patch_size must have 3 entries"),
    ("model.overrides", {"patch_size": 1}, "model.overrides.patch_size duplicates model.patch_size"),
    ("model.overrides", {"x y": 1}, "model.overrides.x y is not a valid argument name"),
    ("model.weights", "a.pt", "model.weights is not a known field"),
    ("spacing", [1, 1, 0], "spacing[2] must be a finite number > 0"),
    ("spacing", [1, 1], "spacing must have 3 entries"),
    ("channels[0].normalization.scheme", "minmax", "channels[0].normalization.scheme must be one of ct,"),
    ("channels[0].normalization.std", 0, "channels[0].normalization.std must be a finite number > 0"),
    ("channels[0].normalization.clip", [600, -1000], "channels[0].normalization.clip must be [low, high]"),
    ("channels[0].normalization.clip", _DELETE, "channels[0].normalization.clip is missing"),
    ("channels[1].normalization", {"scheme": "pet_zscore_body", "mean": 1}, "channels[1].normalization.mean is not a known field"),
    ("channels[1].normalization", {"scheme": "pet_suv", "mean": 0, "std": 1}, "channels[1].normalization.suv_factor is missing"),
    ("channels[1].name", "CT", "channels[1].name 'CT' is used by another channel"),
    ("channels[1].modality", 3, "channels[1].modality must be a non-empty string"),
    ("inference.blending", "max", "inference.blending must be one of uniform, gaussian"),
    ("inference.overlap", 1.0, "inference.overlap must be a finite number >= 0 and < 1"),
    ("inference.tta", "yes", "inference.tta must be true or false"),
    ("inference.tta_axes", "z", "inference.tta_axes must be an array"),
    ("inference.tta_axes", ["z", "w"], 'inference.tta_axes must list distinct axes out of x, y, z (got ["z", "w"])'),
    ("inference.tta_axes", ["z", "z"], "inference.tta_axes must list distinct axes"),
    ("training.epochs", -1, "training.epochs must be an integer >= 0"),
    ("training.metrics", {"dice": float("nan")}, "training.metrics.dice must be a finite number"),
    ("training.optimizer", "adam", "training.optimizer is not a known field"),
]


@pytest.mark.parametrize("path,value,message", BAD, ids=[b[0] + ":" + b[2][:30] for b in BAD])
def test_invalid_meta_names_the_field(path, value, message):
    meta = _set(make_meta(), path, value)
    with pytest.raises(BundleError) as exc:
        B.validate_meta(meta, "bundle.json")
    text = str(exc.value)
    assert message in text
    assert text.startswith("bundle.json: ") and "\n" not in text


def test_non_object_meta():
    with pytest.raises(BundleError, match="must be an object"):
        B.validate_meta([1, 2], "x/bundle.json")


def test_schema_file_agrees_with_validator():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    assert not list(validator.iter_errors(make_meta()))
    assert not list(validator.iter_errors(B.validate_meta(make_meta())))
    # every single-field error above that a schema can express is also a schema error
    cross_field = ("add up", "num_classes (3)", "value must be 1", "used by another", "[low, high]")
    for path, value, message in BAD:
        if any(c in message for c in cross_field):
            continue
        meta = _set(make_meta(), path, value)
        if path == "training.metrics":
            continue  # NaN is not JSON at all; the schema cannot see it
        assert list(validator.iter_errors(meta)), f"schema accepts {path}={value!r}"


# --------------------------------------------------------------------------- save / load


def test_folder_round_trip(tmp_path):
    state = tiny_state()
    out = B.save_bundle(tmp_path / "demo", make_meta(), state)
    assert out == tmp_path / "demo"
    assert listing(out) == ["bundle.json", "model.safetensors"]
    assert listing(tmp_path) == ["demo"]  # no temporary left
    b = B.load_bundle(out)
    assert b.path == out and not b.is_zip
    assert b.name == "petct-lesion-demo"
    assert b.channel_names == ["CT", "PET"]
    assert b.patch_size == (32, 32, 32) and b.spacing == (2.0364, 2.0364, 3.0)
    assert [lab["name"] for lab in b.labels] == ["background", "lesion"]
    assert b.meta == B.validate_meta(make_meta())
    sd = b.state_dict()
    assert set(sd) == set(state)
    for k in state:
        assert torch.equal(sd[k], state[k])
    assert b.tensors["conv.weight"] == ("F32", (4, 2, 3, 3, 3))
    # bundle.json is plain JSON that a person can read
    assert json.loads((out / "bundle.json").read_text())["labels"][1]["color"] == [230, 80, 60]


def test_bundle_is_immutable(folder_bundle):
    b = B.load_bundle(folder_bundle)
    with pytest.raises(AttributeError):
        b.name = "x"
    with pytest.raises(AttributeError):
        b.path = pathlib.Path("/")
    m = b.meta
    m["name"] = "changed"
    m["labels"].append({})
    assert b.name == "petct-lesion-demo" and len(b.meta["labels"]) == 2
    labs = b.labels
    labs[1]["name"] = "x"
    assert b.labels[1]["name"] == "lesion"


def test_zip_round_trip_and_top_folder(tmp_path):
    state = tiny_state()
    z = B.save_bundle(tmp_path / "demo.zip", make_meta(), state)
    assert listing(tmp_path) == ["demo.zip"]
    with zipfile.ZipFile(z) as zf:
        assert sorted(zf.namelist()) == ["bundle.json", "model.safetensors"]
    b = B.load_bundle(str(z))
    assert b.is_zip and b.path == z
    assert torch.equal(b.state_dict()["head.weight"], state["head.weight"])
    # the same files under one top-level folder (as 'zip -r demo.zip demo/' makes)
    folder = B.save_bundle(tmp_path / "demo", make_meta(), state)
    z2 = tmp_path / "nested.zip"
    with zipfile.ZipFile(z2, "w") as zf:
        zf.writestr("demo/", b"")
        for f in ("bundle.json", "model.safetensors"):
            zf.write(folder / f, f"demo/{f}")
    assert B.load_bundle(z2).name == "petct-lesion-demo"


def test_loading_never_modifies_the_bundle(tmp_path, folder_bundle):
    z = B.save_bundle(tmp_path / "demo.zip", make_meta(), tiny_state())
    before = (digest(folder_bundle), digest(z), listing(tmp_path))
    for p in (folder_bundle, z):
        B.load_bundle(p).state_dict()
    assert (digest(folder_bundle), digest(z), listing(tmp_path)) == before


def test_save_refuses_existing_and_missing_parent(tmp_path, folder_bundle):
    before = digest(folder_bundle)
    with pytest.raises(InputError, match="already exists"):
        B.save_bundle(folder_bundle, make_meta(), tiny_state())
    assert digest(folder_bundle) == before
    with pytest.raises(InputError, match="does not exist"):
        B.save_bundle(tmp_path / "nope" / "demo", make_meta(), tiny_state())
    # overwrite replaces a bundle folder...
    B.save_bundle(folder_bundle, make_meta(description="v2"), tiny_state(), overwrite=True)
    assert B.load_bundle(folder_bundle).description == "v2"
    assert listing(tmp_path) == ["demo"]
    # ...but never a folder holding anything else
    other = tmp_path / "home"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not a bundle folder"):
        B.save_bundle(other, make_meta(), tiny_state(), overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"


def test_save_validates_before_writing(tmp_path):
    with pytest.raises(BundleError, match="labels\\[1\\].color"):
        B.save_bundle(tmp_path / "demo", _set(make_meta(), "labels[1].color", [1]), tiny_state())
    with pytest.raises(BundleError, match="not a tensor"):
        B.save_bundle(tmp_path / "demo", make_meta(), {"w": [1.0]})
    assert listing(tmp_path) == []


def test_save_handles_shared_tensors(tmp_path):
    w = torch.arange(6.0)
    out = B.save_bundle(tmp_path / "b", make_meta(), {"a": w, "b": w[:3]})
    sd = B.load_bundle(out).state_dict()
    assert torch.equal(sd["b"], torch.arange(3.0))


# --------------------------------------------------------------------------- refused bundles


def test_missing_files(tmp_path, folder_bundle):
    (folder_bundle / "model.safetensors").unlink()
    with pytest.raises(BundleError, match=r"demo/model\.safetensors: is missing"):
        B.load_bundle(folder_bundle)
    d = tmp_path / "nometa"
    d.mkdir()
    with pytest.raises(BundleError, match=r"nometa/bundle\.json: is missing"):
        B.load_bundle(d)
    with pytest.raises(BundleError, match="no such bundle"):
        B.load_bundle(tmp_path / "absent")
    with pytest.raises(BundleError, match="no such bundle"):
        B.load_bundle(str(tmp_path / "absent.zip"))


def test_corrupt_json(folder_bundle):
    (folder_bundle / "bundle.json").write_text('{"format_version": 1,')
    with pytest.raises(BundleError, match=r"bundle\.json: is not valid JSON"):
        B.load_bundle(folder_bundle)
    meta = json.dumps(make_meta()).replace('"mean": 40.0', '"mean": NaN')
    (folder_bundle / "bundle.json").write_text(meta)
    with pytest.raises(BundleError, match="NaN is not valid JSON"):
        B.load_bundle(folder_bundle)


def test_truncated_safetensors(folder_bundle):
    w = folder_bundle / "model.safetensors"
    data = w.read_bytes()
    for cut in (len(data) - 7, 100, 5, 0):
        w.write_bytes(data[:cut])
        with pytest.raises(BundleError) as exc:
            B.load_bundle(folder_bundle)
        assert str(w) in str(exc.value)
        assert "truncated" in str(exc.value)


def test_garbage_safetensors(folder_bundle):
    (folder_bundle / "model.safetensors").write_bytes(b"hello world, not tensors at all" * 10)
    with pytest.raises(BundleError, match="not a safetensors file"):
        B.load_bundle(folder_bundle)


def test_pickles_are_refused(tmp_path, folder_bundle):
    w = folder_bundle / "model.safetensors"
    torch.save(tiny_state(), w)  # a torch checkpoint disguised by its name
    with pytest.raises(BundleError, match="pickled weights are refused") as exc:
        B.load_bundle(folder_bundle)
    assert str(w) in str(exc.value)
    w.write_bytes(pickle.dumps({"w": [1, 2, 3]}, protocol=2))
    with pytest.raises(BundleError, match="is a Python pickle; pickled weights are refused"):
        B.load_bundle(folder_bundle)
    w.unlink()
    torch.save(tiny_state(), folder_bundle / "model.pt")
    with pytest.raises(BundleError, match="model.pt is not accepted: pickled weights are refused"):
        B.load_bundle(folder_bundle)
    pt = tmp_path / "weights.pth"
    torch.save(tiny_state(), pt)
    with pytest.raises(BundleError, match="pickled checkpoints are refused"):
        B.load_bundle(pt)


def _zip_with(path, members):
    """members: list of (ZipInfo or name, bytes)."""
    with zipfile.ZipFile(path, "w") as zf:
        for info, data in members:
            zf.writestr(info, data)
    return path


@pytest.fixture
def parts(folder_bundle):
    return {n: (folder_bundle / n).read_bytes() for n in ("bundle.json", "model.safetensors")}


def _symlink_info(name):
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@pytest.mark.parametrize("members,message", [
    ([("../bundle.json", "meta"), ("model.safetensors", "w")], "points outside the bundle"),
    ([("bundle.json", "meta"), ("a/../../model.safetensors", "w")], "points outside the bundle"),
    ([("/bundle.json", "meta"), ("model.safetensors", "w")], "absolute path"),
    ([("bundle.json", "meta"), ("C:/model.safetensors", "w")], "absolute path"),
    ([("bundle.json", "meta"), (_symlink_info("model.safetensors"), b"/etc/passwd")], "symbolic link"),
    ([("bundle.json", "meta"), ("model.safetensors", "w"), ("run.py", b"print(1)")], "'run.py' is not allowed"),
    ([("bundle.json", "meta"), ("model.pt", "pt")], "looks like pickled weights; pickles are refused"),
    ([("bundle.json", "meta")], "model.safetensors is missing from the zip"),
    ([("a/bundle.json", "meta"), ("b/model.safetensors", "w")], "under one top-level folder"),
    ([("a/b/bundle.json", "meta"), ("a/b/model.safetensors", "w")], "is not allowed"),
    ([("bundle.json", "meta"), ("model.safetensors", "w"), ("x/bundle.json", "meta")], "more than once"),
], ids=["dotdot", "dotdot-inner", "absolute", "drive", "symlink", "extra", "pickle", "missing", "two-tops",
        "nested", "duplicate"])
def test_unsafe_zips_are_refused(tmp_path, parts, members, message):
    z = tmp_path / "evil.zip"
    members = [(info, parts["bundle.json"] if data == "meta" else parts["model.safetensors"] if data == "w"
                else torch_pickle() if data == "pt" else data) for info, data in members]
    _zip_with(z, members)
    before = listing(tmp_path)
    with pytest.raises(BundleError) as exc:
        B.load_bundle(z)
    assert message in str(exc.value)
    assert str(z) in str(exc.value)
    assert listing(tmp_path) == before  # nothing extracted anywhere
    assert not (tmp_path.parent / "bundle.json").exists()


def torch_pickle():
    import io

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    return buf.getvalue()


def test_zip_size_cap_and_corrupt_zip(tmp_path, parts, monkeypatch):
    z = _zip_with(tmp_path / "b.zip", [("bundle.json", parts["bundle.json"]),
                                       ("model.safetensors", parts["model.safetensors"])])
    monkeypatch.setattr(B, "MAX_WEIGHTS_BYTES", 64)
    with pytest.raises(BundleError, match="exceeds the limit|larger than"):
        B.load_bundle(z)
    monkeypatch.undo()
    data = z.read_bytes()
    (tmp_path / "cut.zip").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="cut.zip: is not a valid zip file"):
        B.load_bundle(tmp_path / "cut.zip")
    # a truncated weights member inside a well-formed zip
    w = parts["model.safetensors"]
    z3 = _zip_with(tmp_path / "short.zip", [("bundle.json", parts["bundle.json"]), ("model.safetensors", w[:-10])])
    with pytest.raises(BundleError, match=r"short.zip!model.safetensors: is truncated"):
        B.load_bundle(z3)


# --------------------------------------------------------------------------- build_model


def test_build_model_strict_keys_with_plain_module(tmp_path, monkeypatch):
    built = []

    def fake_build(name, in_channels, num_classes, patch_size, **overrides):
        built.append((name, in_channels, num_classes, patch_size, overrides))
        return Tiny(in_channels, num_classes, patch_size, **overrides)

    monkeypatch.setattr(VeloxSegLib, "build_model", fake_build)
    full = tiny_state()
    meta = _set(make_meta(), "model.overrides", {"width": 4})
    b = B.load_bundle(B.save_bundle(tmp_path / "full", meta, full))
    model = b.build_model()
    assert built[-1] == ("veloxseg-b", (1, 1), 2, (32, 32, 32), {"width": 4})
    assert not model.training
    assert torch.equal(model.conv.weight, full["conv.weight"])

    # training-only keys may be absent...
    infer = {k: v for k, v in full.items() if not k.startswith("teacher.")}
    model = B.load_bundle(B.save_bundle(tmp_path / "infer", meta, infer)).build_model()
    assert torch.equal(model.head.weight, full["head.weight"])
    # ...or present when the model is built without them
    no_teacher = _set(copy.deepcopy(meta), "model.overrides", {"width": 4, "with_teacher": False})
    B.load_bundle(B.save_bundle(tmp_path / "extra", no_teacher, full)).build_model()

    # a missing inference key, an unknown key, a wrong shape: BundleError naming the file
    cases = {
        "missing": ({k: v for k, v in full.items() if k != "head.bias"}, "lacks 1 tensor(s)"),
        "unknown": ({**full, "decoder.weight": torch.zeros(1)}, "does not have (e.g. decoder.weight)"),
        "shape": ({**full, "head.weight": torch.zeros(2, 5, 1, 1, 1)}, "tensor 'head.weight' has shape (2, 5, 1, 1, 1)"),
    }
    for name, (state, message) in cases.items():
        p = B.save_bundle(tmp_path / name, meta, state)
        with pytest.raises(BundleError) as exc:
            B.load_bundle(p).build_model()
        assert message in str(exc.value)
        assert str(p / "model.safetensors") in str(exc.value)

    bad_override = _set(copy.deepcopy(meta), "model.overrides", {"depth": 3})
    with pytest.raises(BundleError, match="cannot be built from bundle.json"):
        B.load_bundle(B.save_bundle(tmp_path / "bad", bad_override, full)).build_model()


def test_build_model_veloxseg_b(tmp_path):
    """The real network: an inference-only bundle reproduces the original model's output."""
    torch.manual_seed(0)
    # 64^3: the smallest patch whose deepest stage keeps more than one voxel for InstanceNorm
    net = VeloxSegLib.build_model("veloxseg-b", in_channels=(1, 1), num_classes=2, patch_size=(64, 64, 64)).eval()
    state = net.inference_state_dict() if hasattr(net, "inference_state_dict") else net.state_dict()
    meta = _set(make_meta(), "model.patch_size", [64, 64, 64])
    z = B.save_bundle(tmp_path / "vb.zip", meta, state)
    model = B.load_bundle(z).build_model("cpu")
    assert not model.training
    x = torch.randn(1, 2, 64, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), net(x), atol=1e-5)
    # a training checkpoint's full state dict (teachers, deep-supervision heads) loads too
    full = B.load_bundle(B.save_bundle(tmp_path / "full", meta, net.state_dict())).build_model()
    loaded = full.state_dict()
    for key, value in net.state_dict().items():
        assert torch.equal(loaded[key], value), key
    # a bundle whose classes disagree with the weights is refused, naming the file
    meta["model"]["num_classes"] = 3
    meta["labels"].append({"value": 2, "name": "other"})
    p = B.save_bundle(tmp_path / "mismatch", meta, state)
    with pytest.raises(BundleError, match=r"mismatch/model\.safetensors: tensor '.*' has shape"):
        B.load_bundle(p).build_model()


# --------------------------------------------------------------------------- discovery


def test_import_does_not_load_torch():
    code = "import sys, VeloxSegLib.bundle; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_dirs(monkeypatch, tmp_path):
    assert B.embedded_bundles_dir() == pathlib.Path(VeloxSegLib.__file__).parent / "bundles"
    monkeypatch.setenv("VELOXSEG_MODELS", str(tmp_path / "m"))
    assert B.user_models_dir() == tmp_path / "m"
    monkeypatch.delenv("VELOXSEG_MODELS")
    assert B.user_models_dir() == pathlib.Path.home() / ".veloxseg" / "models"


def test_list_and_find(monkeypatch, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    monkeypatch.setenv("VELOXSEG_MODELS", str(models))
    monkeypatch.setattr(B, "embedded_bundles_dir", lambda: tmp_path / "embedded")
    with pytest.raises(BundleError, match="no bundles are installed"):
        B.find_bundle("anything")
    B.save_bundle(models / "good", make_meta(name="good-one"), tiny_state())
    B.save_bundle(models / "zipped.zip", make_meta(name="zipped"), tiny_state())
    broken = models / "broken"
    broken.mkdir()
    (broken / "bundle.json").write_text("{}")
    (models / ".partial.tmp").mkdir()  # a temporary of an interrupted save: not listed
    (models / "readme.txt").write_text("not a bundle")

    entries = B.list_bundles()
    by_name = {e["name"]: e for e in entries}
    assert set(by_name) == {"good-one", "zipped", "broken"}
    good = by_name["good-one"]
    assert good["source"] == "user" and good["path"] == str(models / "good")
    assert good["channels"] == ["CT", "PET"] and good["labels"] == ["background", "lesion"]
    assert "error" not in good and "error" in by_name["broken"]
    assert "bundle.json" in by_name["broken"]["error"]

    assert B.find_bundle("good-one") == models / "good"
    assert B.find_bundle("zipped") == models / "zipped.zip"
    assert B.load_bundle("good-one").name == "good-one"
    assert B.load_bundle("zipped").is_zip
    with pytest.raises(BundleError) as exc:
        B.load_bundle("nonexistent-model")
    assert "available: good-one, zipped" in str(exc.value)


def test_listing_reads_only_the_header_of_zipped_weights(monkeypatch, tmp_path):
    import tracemalloc

    models = tmp_path / "models"
    models.mkdir()
    monkeypatch.setenv("VELOXSEG_MODELS", str(models))
    monkeypatch.setattr(B, "embedded_bundles_dir", lambda: tmp_path / "embedded")
    state = tiny_state()
    state["big"] = torch.zeros(2_000_000)  # 8 MB of weights
    B.save_bundle(models / "big.zip", make_meta(name="big"), state)
    tracemalloc.start()
    try:
        entries = B.list_bundles()
        assert B.find_bundle("big") == models / "big.zip"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [e["name"] for e in entries] == ["big"] and "error" not in entries[0]
    assert peak < 2_000_000, peak
    assert B.load_bundle("big").state_dict()["big"].shape == (2_000_000,)  # loading still reads it all


def test_listing_still_reports_broken_zipped_weights(monkeypatch, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    monkeypatch.setenv("VELOXSEG_MODELS", str(models))
    monkeypatch.setattr(B, "embedded_bundles_dir", lambda: tmp_path / "embedded")
    good = B.save_bundle(tmp_path / "good.zip", make_meta(name="x"), tiny_state())
    with zipfile.ZipFile(good) as zf:
        meta, weights = zf.read("bundle.json"), zf.read("model.safetensors")
    for name, data in (("short", weights[:-10]), ("garbage", pickle.dumps({"w": list(range(50))}, protocol=4)),
                       ("badheader", weights[:8] + b"[" + weights[9:])):
        with zipfile.ZipFile(models / f"{name}.zip", "w") as zf:
            zf.writestr("bundle.json", meta)
            zf.writestr("model.safetensors", data)
    errors = {e["name"]: e.get("error", "") for e in B.list_bundles()}
    assert "short.zip!model.safetensors: is truncated" in errors["short"]
    assert "pickle" in errors["garbage"]
    assert "is not a safetensors file" in errors["badheader"]
