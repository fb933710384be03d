"""Lesion visibility of PET/CT phantoms (``VeloxSegLib.data.visibility``, ``veloxseg visibility``,
``veloxseg evaluate --visibility``).

The detectability index is checked against its definition by simulation: explicit noise and
clutter draws, and the phantom generator's own noise drawn many times; the linear shortcut of
the lesion signals against full noise-free rebuilds of the case.
"""
import json
import math
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from VeloxSegLib.cli import main
from VeloxSegLib.data import visibility as V
from VeloxSegLib.data.phantom import petct_scene, write_phantom_dataset
from VeloxSegLib.errors import InputError

SMALL = (64, 64, 48)  # 6 x 6 x 7 mm CT voxels: fast, and still 1-5 lesions a case


def test_npw_dprime_is_the_observer_snr_by_simulation():
    """d' = (mean of w.g with the signal - without) / sd of w.g, for the template w = s, against
    correlated noise and a clutter drawn from the same list the function is given."""
    rng = np.random.default_rng(0)
    n = 40
    s = np.exp(-0.5 * ((np.arange(n) - 20) / 3.0) ** 2)
    mix = rng.normal(size=(n, n)) * 0.3 + np.eye(n)  # correlated noise: n = mix @ e
    clutter = [np.sin(np.arange(n) / (2 + k)) * rng.uniform(0.5, 1.5) for k in range(6)]
    noise_var = float(s @ mix @ mix.T @ s)
    d = V.npw_dprime(s, noise_var, clutter)
    draws = 200_000
    e = rng.normal(size=(draws, n)) @ mix.T
    c = np.asarray(clutter)[rng.integers(len(clutter), size=draws)]
    t0 = (e + c) @ s  # without the signal
    t1 = t0 + s @ s  # with it
    assert d == pytest.approx((t1.mean() - t0.mean()) / math.sqrt(np.mean(t0 ** 2)), rel=0.01)
    assert V.npw_dprime(np.zeros(5), 1.0) == 0.0 and math.isinf(V.npw_dprime(np.ones(5), 0.0))
    assert V.npw_dprime(s, noise_var) > d  # clutter only ever hides a lesion


def test_lesion_signals_are_full_rebuilds_without_the_lesion():
    scene = petct_scene(31, 0, size=SMALL)
    comps, n = V._components(scene.label)
    assert n == 4  # a node and three liver lesions, some faint in CT
    full_ct = scene.ct_mean()
    full_pet = scene.pet_post(scene.pet_acquire(scene.activity()))
    peaks = []
    for k in range(1, n + 1):
        mask = comps == k
        s_ct, s_pet = V.lesion_signals(scene, mask)
        without = scene.label & ~mask
        ct_diff = full_ct - scene.ct_mean(label=without)
        pet_diff = full_pet - scene.pet_post(scene.pet_acquire(scene.activity(label=without)))
        assert np.abs(pet_diff).max() > 0.01
        np.testing.assert_allclose(s_ct, ct_diff, atol=1e-3 * max(np.abs(ct_diff).max(), 1e-3))
        np.testing.assert_allclose(s_pet, pet_diff, atol=1e-3 * np.abs(pet_diff).max())
        peaks.append(float(np.abs(ct_diff).max()))
    assert max(peaks) > 10.0  # the node, in fat: a real CT signal, not only zeros compared


def test_noise_variances_match_the_generators_own_noise():
    """Var(s . n) for n drawn as the generator draws it (CT: white; PET: sqrt(SUV)-scaled, then the
    post-filter), 300 times."""
    scene = petct_scene(31, 0, size=SMALL)
    comps, _ = V._components(scene.label)
    s_ct, s_pet = V.lesion_signals(scene, comps == 1 + int(np.argmax(np.bincount(comps.ravel())[1:])))
    pet_mean = scene.pet_acquire(scene.activity())
    ct_var, pet_var = V.noise_variances(scene, s_ct, s_pet, pet_mean)
    rng = np.random.default_rng(1)
    sd = scene.scanner.pet_noise * np.sqrt(np.maximum(pet_mean, 0))
    pet_t = [float(np.sum(s_pet * scene.pet_post((rng.normal(size=pet_mean.shape) * sd).astype(np.float32))))
             for _ in range(1000)]
    ct_t = [float(np.sum(s_ct * rng.normal(0.0, scene.scanner.ct_noise_hu, size=s_ct.shape))) for _ in range(300)]
    # a sample variance of N draws is within 3 standard errors, 3 x sqrt(2 / N), of the truth:
    # 13% for PET (leaving out the post-filter's effect on the noise would be 24% off) and 25% for CT
    assert np.var(pet_t) == pytest.approx(pet_var, rel=0.13)
    assert np.var(ct_t) == pytest.approx(ct_var, rel=0.25)


def test_noisier_scanner_lowers_every_lesions_dprime():
    default = V.lesion_visibility(901, 2, size=SMALL, draws=3)
    low = V.lesion_visibility(901, 2, size=SMALL, scanner="low-dose", draws=3)  # PET noise x1.41, CT 40 HU against 14
    assert [e["voxels"] for e in default] == [e["voxels"] for e in low]
    for a, b in zip(default, low):
        assert b["pet_dprime"] < a["pet_dprime"] and b["ct_dprime"] < a["ct_dprime"]
        assert a["site"] in ("lung", "liver", "node", "bone") and a["records"]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("vis") / "ph"
    write_phantom_dataset(root, "petct", 3, seed=31, size=SMALL)
    return root


def test_cli_visibility_then_evaluate(phantoms, tmp_path, capsys):
    out = tmp_path / "vis.json"
    assert main(["visibility", str(phantoms), "-o", str(out), "--draws", "4"]) == 0
    summary = capsys.readouterr().out
    data = json.loads(out.read_text())
    lesions = [e for les in data["cases"].values() for e in les]
    assert sorted(data["cases"]) == ["petct_0000", "petct_0001", "petct_0002"] and lesions
    assert f"{len(lesions)} lesions in 3 cases" in summary
    label = sitk.ReadImage(str(phantoms / "labelsTr" / "petct_0000.nii.gz"))
    assert sum(e["voxels"] for e in data["cases"]["petct_0000"]) == int(sitk.GetArrayFromImage(label).sum())
    # the reference as its own prediction: every lesion found, each with its d'
    res = tmp_path / "ev.json"
    assert main(["evaluate", "--pred", str(phantoms / "labelsTr"), "--ref", str(phantoms / "labelsTr"),
                 "--visibility", str(out), "--json", str(res)]) == 0  # --visibility implies --lesions
    table = capsys.readouterr().out
    assert "detection by visibility" in table
    ev = json.loads(res.read_text())
    per = [e for c in ev["cases"] for e in c["lesions"]["1"]["per_lesion"]]
    assert len(per) == len(lesions) and all("pet_dprime" in e and "ct_dprime" in e for e in per)
    assert sorted(e["pet_dprime"] for e in per) == pytest.approx(sorted(e["pet_dprime"] for e in lesions))
    bins = ev["lesion_visibility"]["1"]
    assert sum(b["lesions"] for b in bins) == sum(b["found"] for b in bins) == len(lesions)
    assert sum(b["ct_visible"] for b in bins) == sum(1 for e in lesions if e["ct_dprime"] >= 5.0)
    # nothing predicted: every lesion missed, in the same bins
    empty = tmp_path / "empty"
    empty.mkdir()
    for f in (phantoms / "labelsTr").iterdir():
        img = sitk.ReadImage(str(f))
        zero = sitk.Image(img.GetSize(), img.GetPixelID())
        zero.CopyInformation(img)
        sitk.WriteImage(zero, str(empty / f.name))
    assert main(["evaluate", "--pred", str(empty), "--ref", str(phantoms / "labelsTr"),
                 "--visibility", str(out), "--json", "-"]) == 0
    missed = json.loads(capsys.readouterr().out)["lesion_visibility"]["1"]
    assert [b["lesions"] for b in missed] == [b["lesions"] for b in bins] and not any(b["found"] for b in missed)


def test_worker_processes_give_the_same_figures(phantoms):
    one = V.dataset_visibility(phantoms, draws=2)
    assert V.dataset_visibility(phantoms, draws=2, workers=2) == one
    with pytest.raises(Exception, match="workers"):
        V.dataset_visibility(phantoms, workers=0)


def test_visibility_refuses_what_it_cannot_rebuild(phantoms, tmp_path, capsys):
    # a label changed after generation
    changed = tmp_path / "changed"
    shutil.copytree(phantoms, changed)
    path = changed / "labelsTr" / "petct_0001.nii.gz"
    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img)
    arr[0, 0, 0] = 1
    out_img = sitk.GetImageFromArray(arr)
    out_img.CopyInformation(img)
    sitk.WriteImage(out_img, str(path))
    with pytest.raises(InputError, match="petct_0001.*not the one the phantom generator draws"):
        V.dataset_visibility(changed, draws=1)
    assert main(["visibility", str(changed), "-o", str(tmp_path / "v.json"), "--workers", "2"]) != 0
    assert "petct_0001" in capsys.readouterr().err and not (tmp_path / "v.json").exists()  # raised in a worker
    # not a PET/CT phantom dataset; another generator version
    mri = tmp_path / "mri"
    write_phantom_dataset(mri, "mri", 1, seed=1, size=(32, 32, 32))
    with pytest.raises(InputError, match="not a PET/CT phantom dataset"):
        V.dataset_visibility(mri)
    meta = json.loads((changed / "dataset.json").read_text())
    meta["veloxseg_phantom"]["version"] = 99
    (changed / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="generator version 99"):
        V.dataset_visibility(changed)
    with pytest.raises(Exception, match="draws"):
        V.lesion_visibility(1, 0, draws=0)


def test_visibility_rebuilds_small_lesion_phantoms_from_their_record(tmp_path):
    """A `--lesion-diameter` dataset is rebuilt with the range its dataset.json records: without
    the record the generator's default lesions are not the ones on disk, and a bad record is named."""
    ds = tmp_path / "small"
    write_phantom_dataset(ds, "petct", 2, seed=5, size=SMALL, lesion_diameter_mm=(6, 14))
    out = V.dataset_visibility(ds, draws=1)
    assert out["lesion_diameter_mm"] == [6.0, 14.0]
    assert sum(len(v) for v in out["cases"].values()) >= 2
    meta = json.loads((ds / "dataset.json").read_text())
    record = meta["veloxseg_phantom"].pop("lesion_diameter_mm")
    (ds / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="not the one the phantom generator draws"):
        V.dataset_visibility(ds, draws=1)
    meta["veloxseg_phantom"]["lesion_diameter_mm"] = [record[1], record[0]]
    (ds / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="dataset.json.*veloxseg_phantom record.*min <= max"):
        V.dataset_visibility(ds, draws=1)


def test_evaluate_visibility_refusals(phantoms, tmp_path, capsys):
    vis = tmp_path / "vis.json"
    assert main(["visibility", str(phantoms), "-o", str(vis), "--draws", "1"]) == 0
    capsys.readouterr()
    labels = str(phantoms / "labelsTr")
    res = tmp_path / "o.json"
    # lesions merged by a dilation are not the file's lesions
    assert main(["evaluate", "--pred", labels, "--ref", labels, "--visibility", str(vis),
                 "--lesion-dilation", "1", "--json", str(res)]) == 2
    assert "--lesion-dilation 0" in capsys.readouterr().err and not res.exists()
    # a file of other phantoms: same case names, other lesions
    data = json.loads(vis.read_text())
    for les in data["cases"].values():
        for e in les:
            e["centre_mm"] = [v + 5.0 for v in e["centre_mm"]]
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    assert main(["evaluate", "--pred", labels, "--ref", labels, "--visibility", str(other),
                 "--json", str(res)]) == 2
    assert "has no lesion of" in capsys.readouterr().err and not res.exists()
    data = json.loads(vis.read_text())
    data["cases"].pop("petct_0002")
    other.write_text(json.dumps(data))
    assert main(["evaluate", "--pred", labels, "--ref", labels, "--visibility", str(other)]) == 2
    assert "no case 'petct_0002'" in capsys.readouterr().err
    data = json.loads(vis.read_text())
    del data["cases"]["petct_0001"][0]["pet_dprime"]
    other.write_text(json.dumps(data))
    assert main(["evaluate", "--pred", labels, "--ref", labels, "--visibility", str(other)]) == 2
    assert "case 'petct_0001': a lesion entry without" in capsys.readouterr().err
    (tmp_path / "junk.json").write_text("[1, 2]")
    assert main(["evaluate", "--pred", labels, "--ref", labels, "--visibility", str(tmp_path / "junk.json")]) == 2
    assert "not a `veloxseg visibility` file" in capsys.readouterr().err
