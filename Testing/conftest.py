import os

import pytest

# Keep torch from oversubscribing the 2-core CI machine when several tests spawn processes.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def petct_case(tmp_path_factory):
    """``petct_case(seed)`` -> ([CT, PET] paths, label path): one small PET/CT phantom
    (96 x 96 x 72), written once per seed and session."""
    cases = {}

    def make(seed):
        if seed not in cases:
            from VeloxSegLib.data.phantom import write_phantom_dataset

            root = tmp_path_factory.mktemp(f"petct{seed}") / "ds"
            write_phantom_dataset(root, "petct", 1, seed=seed, size=(96, 96, 72))
            cases[seed] = ([str(root / "imagesTr" / f"petct_0000_000{c}.nii.gz") for c in range(2)],
                           root / "labelsTr" / "petct_0000.nii.gz")
        return cases[seed]

    return make


@pytest.fixture(scope="session")
def store_dataset(tmp_path_factory):
    """Three small PET/CT phantoms (64 x 64 x 48, seed 4) and the run setup planned on them:
    (dataset folder, RunSetup), for the tests of the folder of preprocessed cases. Read only."""
    from VeloxSegLib.data.phantom import write_phantom_dataset
    from VeloxSegLib.train.trainer import RunSetup, TrainConfig, resolve_plans

    root = tmp_path_factory.mktemp("store") / "ds"
    write_phantom_dataset(root, "petct", 3, seed=4, size=(64, 64, 48))
    return root, RunSetup.from_plans(resolve_plans(root), TrainConfig())
