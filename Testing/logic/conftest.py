"""Slicer-core fixtures for the MRML logic tests: one scene and the module logics per session."""
import pytest
from logic_helpers import bundle_json, ijk_to_ras_matrix

pytest.importorskip("slicer", reason="slicer-core is not installed")


@pytest.fixture(scope="session")
def session():
    from VeloxSegLogic.core import core_session

    return core_session()


@pytest.fixture
def scene(session):
    """The session's scene, emptied after each test (singletons such as parameter nodes too)."""
    yield session.scene
    session.scene.Clear(1)


@pytest.fixture
def oblique_matrix():
    """Oblique, anisotropic IJK-to-RAS."""
    return ijk_to_ras_matrix((0.8, 0.65, 2.5), (12.5, -30.0, 41.0), (17, -9, 28))


@pytest.fixture
def metadata_bundle(tmp_path):
    """A bundle folder with bundle.json and a placeholder weights file (for metadata-only paths)."""
    import json

    folder = tmp_path / "bundles" / "petct-test"
    folder.mkdir(parents=True)
    (folder / "bundle.json").write_text(json.dumps(bundle_json()), encoding="utf-8")
    (folder / "model.safetensors").write_bytes(b"")
    return folder
