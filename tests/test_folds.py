from collections import Counter
from pathlib import Path

import pytest

from covidct.data import SiteDataModule
from covidct.data.folds import N_FOLDS, assign_groups, split_fold
from covidct.data.sources import scan_site
from covidct.errors import ConfigError


@pytest.fixture(scope="module")
def real_samples(real_data: Path):
    return {site: scan_site(real_data, site) for site in ("A", "B")}


def test_folds_are_stratified_and_group_disjoint(real_samples):
    for site, samples in real_samples.items():
        fold_of = assign_groups(samples, N_FOLDS, seed=0)
        groups_in = {}
        for s, f in zip(samples, fold_of):
            groups_in.setdefault(s.group, set()).add(f)
        assert all(len(f) == 1 for f in groups_in.values()), f"a {site} group straddles folds"
        covid_share = sum(s.label for s in samples) / len(samples)
        for f in range(N_FOLDS):
            part = [s for s, k in zip(samples, fold_of) if k == f]
            assert abs(len(part) - len(samples) / N_FOLDS) < 0.03 * len(samples), (site, f, len(part))
            assert abs(sum(s.label for s in part) / len(part) - covid_share) < 0.03, (site, f)


def test_every_image_is_tested_exactly_once(real_samples):
    samples = real_samples["B"]
    tested = Counter()
    for fold in range(N_FOLDS):
        parts = split_fold(samples, fold, split_seed=0, val_fraction=0.1)
        assert sum(len(p) for p in parts.values()) == len(samples)
        groups = {name: {s.group for s in p} for name, p in parts.items()}
        assert not groups["train"] & groups["val"] and not groups["train"] & groups["test"]
        assert not groups["val"] & groups["test"]
        assert 0.07 < len(parts["val"]) / (len(parts["train"]) + len(parts["val"])) < 0.13
        tested.update(s.path for s in parts["test"])
    assert set(tested.values()) == {1} and len(tested) == len(samples)


def test_folds_depend_only_on_split_seed(real_samples):
    samples = real_samples["A"]
    assert assign_groups(samples, 4, seed=3) == assign_groups(samples, 4, seed=3)
    assert assign_groups(samples, 4, seed=3) != assign_groups(samples, 4, seed=4)


def test_datamodule_splits_ignore_training_seed(real_data: Path):
    def test_files(seed: int, split_seed: int) -> list[str]:
        dm = SiteDataModule(real_data, fold=1, seed=seed, split_seed=split_seed, num_workers=0)
        dm.setup()
        return [s.name for s in dm.splits["B"]["test"]]

    assert test_files(seed=1, split_seed=0) == test_files(seed=2, split_seed=0)
    assert test_files(seed=1, split_seed=0) != test_files(seed=1, split_seed=5)


def test_image_level_grouping_can_split_a_patient(real_data: Path):
    samples = scan_site(real_data, "B", group_by="image")
    assert len({s.group for s in samples}) == len(samples)
    patient_of = {s.path: s.group for s in scan_site(real_data, "B")}
    fold_of = assign_groups(samples, N_FOLDS, seed=0)
    folds_of_patient = {}
    for s, f in zip(samples, fold_of):
        folds_of_patient.setdefault(patient_of[s.path], set()).add(f)
    assert any(len(f) > 1 for f in folds_of_patient.values()), "image-level folds should leak patients"


def test_bad_fold_is_refused(real_samples):
    with pytest.raises(ConfigError, match="fold must be in 0..3"):
        split_fold(real_samples["B"], 4, 0, 0.1)
