import math
from collections import Counter
from pathlib import Path

import torch

from covidct.data import SiteDataModule
from covidct.data.sampler import SiteBalancedBatchSampler, SiteEpochDraws


def test_every_batch_is_16_plus_16_and_site_b_repeats_4x():
    n_a, n_b = 1674, 503
    a, b = range(n_a), range(n_a, n_a + n_b)
    sampler = SiteBalancedBatchSampler(SiteEpochDraws([a, b], [1, 4], batch_per_site=16, seed=7))
    batches = [[i for i, _ in batch] for batch in sampler]
    assert len(batches) == len(sampler) == math.ceil(4 * n_b / 16)
    for batch in batches:
        assert len(batch) == 32
        assert all(i < n_a for i in batch[:16]) and all(i >= n_a for i in batch[16:])
    counts_b = Counter(i for batch in batches for i in batch[16:])
    assert set(counts_b) == set(b)
    assert min(counts_b.values()) == 4
    assert sum(c - 4 for c in counts_b.values()) == len(batches) * 16 - 4 * n_b  # top-up of the last batch only
    counts_a = Counter(i for batch in batches for i in batch[:16])
    assert set(counts_a) == set(a) and min(counts_a.values()) >= 1


def test_order_depends_on_seed_and_epoch_only():
    def epoch(seed: int, e: int) -> list[list[int]]:
        s = SiteBalancedBatchSampler(SiteEpochDraws([range(50), range(50, 70)], [1, 4], 16, seed=seed))
        s.sampler.set_epoch(e)
        return list(s)  # (index, augmentation seed) pairs

    assert epoch(1, 0) == epoch(1, 0)
    assert epoch(1, 0) != epoch(1, 1)
    assert epoch(1, 0) != epoch(2, 0)


def test_augmentation_is_reproducible_per_drawn_sample(phantom_root: Path, tmp_path: Path):
    def first_batch(workers: int, epoch: int) -> torch.Tensor:
        dm = SiteDataModule(
            phantom_root, image_size=32, batch_per_site=4, num_workers=workers, cache_dir=tmp_path, seed=3
        )
        dm.setup()
        loader = dm.train_dataloader()
        loader.batch_sampler.sampler.set_epoch(epoch)  # what the loop calls: see test_epochs.py
        return next(iter(loader))["image"]

    assert torch.equal(first_batch(0, 0), first_batch(2, 0))
    assert not torch.equal(first_batch(0, 0), first_batch(0, 1))


def test_datamodule_train_batches(phantom_root: Path, tmp_path: Path):
    dm = SiteDataModule(
        phantom_root, image_size=32, batch_per_site=4, val_fraction=0.1, num_workers=0, cache_dir=tmp_path
    )
    dm.setup()
    loader = dm.train_dataloader()
    n_b = len(dm.splits["B"]["train"])
    assert len(loader) == math.ceil(max(len(dm.splits["A"]["train"]), 4 * n_b) / 4)
    batch = next(iter(loader))
    assert batch["image"].shape == (8, 3, 32, 32) and batch["image"].dtype == torch.uint8  # normalised on device
    assert batch["site"].tolist() == [0] * 4 + [1] * 4
    assert batch["site_layout"] == ((0, 1), (4, 4))  # declared for the models' block routing
    assert len(batch["file"]) == 8
    eval_batch = next(iter(dm.test_dataloader()[1]))
    assert eval_batch["image"].shape[1:] == (3, 32, 32) and set(eval_batch["site"].tolist()) == {1}
    assert eval_batch["site_layout"] == ((1,), (len(eval_batch["site"]),))


def test_single_site_mode(phantom_root: Path, tmp_path: Path):
    dm = SiteDataModule(phantom_root, sites=["B"], image_size=32, batch_per_site=4, num_workers=0, cache_dir=tmp_path)
    dm.setup()
    loader = dm.train_dataloader()
    assert len(loader) == math.ceil(4 * len(dm.splits["B"]["train"]) / 4)  # as many steps as in the two-site run
    assert set(next(iter(loader))["site"].tolist()) == {0}  # a site's index is its place in data.sites
    assert len(dm.test_dataloader()) == 1


def test_cache_decodes_once_and_notices_changed_files(phantom_root: Path, tmp_path: Path, monkeypatch):
    import shutil

    from covidct.data import cache as cache_module

    root = tmp_path / "data"
    shutil.copytree(phantom_root, root)
    decoded = []
    real_load = cache_module.load_image
    monkeypatch.setattr(cache_module, "load_image", lambda p, *window: decoded.append(p) or real_load(p, *window))
    cache = cache_module.DecodedImageCache(tmp_path / "cache", image_size=32)
    path = root / "sars-cov-2" / "COVID" / "img000.png"
    first = cache.get(path, "eval")
    again = cache_module.DecodedImageCache(tmp_path / "cache", image_size=32).get(path, "eval")
    assert len(decoded) == 1 and (first == again).all() and first.shape == (32, 32, 3)
    assert min(cache.get(path, "train").shape[:2]) == round(32 * 256 / 224)
    shutil.copy(root / "sars-cov-2" / "COVID" / "img001.png", path)
    changed = cache.get(path, "eval")
    assert len(decoded) == 3 and not (changed == first).all()


def test_setup_warms_the_cache_and_stops_on_a_corrupt_image(phantom_root: Path, tmp_path: Path):
    import shutil

    import pytest

    from covidct.errors import DataError

    dm = SiteDataModule(phantom_root, image_size=32, num_workers=2, batch_per_site=4, cache_dir=tmp_path / "c")
    dm.setup()
    assert len(list((tmp_path / "c").rglob("*.npy"))) == 2 * 2 * 24  # each image once, in its part's resize
    assert dm.cache.warm(dm._cache_items()) == 0

    root = tmp_path / "data"
    shutil.copytree(phantom_root, root)
    bad = root / "covid-ct" / "CT_NonCOVID" / "img005.png"
    bad.write_bytes(bad.read_bytes()[:50])
    broken = SiteDataModule(root, image_size=32, num_workers=2, batch_per_site=4, cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match="img005.png"):
        broken.setup()


def test_ranks_share_out_an_epoch_without_overlap():
    sites = [range(40), range(40, 50)]
    single = [tuple(b) for b in SiteBalancedBatchSampler(SiteEpochDraws(sites, [1, 4], 4, seed=2))]
    ranks = [
        [tuple(b) for b in SiteBalancedBatchSampler(SiteEpochDraws(sites, [1, 4], 4, seed=2, rank=r, world_size=2))]
        for r in (0, 1)
    ]
    assert len(ranks[0]) == len(ranks[1]) == math.ceil(len(single) / 2)
    assert sorted(ranks[0] + ranks[1]) == sorted(single)  # 10 steps: dealt 5 + 5, every batch once
    assert all(len(b) == 8 for b in ranks[0] + ranks[1])


def test_normalising_on_the_device_is_albumentations_normalize(phantom_root: Path, tmp_path: Path):
    """Workers ship uint8; the DataModule's after-transfer hook gives what A.Normalize gave on the CPU."""
    import albumentations as A
    import numpy as np

    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    dm = SiteDataModule(phantom_root, image_size=32, num_workers=0, cache_dir=tmp_path, mean=mean, std=std)
    dm.setup()
    batch = next(iter(dm.test_dataloader()[0]))
    expected = np.stack(
        [
            A.Normalize(mean=mean, std=std, max_pixel_value=255.0)(image=im)["image"]
            for im in batch["image"].permute(0, 2, 3, 1).numpy()
        ]
    ).transpose(0, 3, 1, 2)
    normalised = dm.on_after_batch_transfer(batch, 0)["image"]
    assert normalised.dtype == torch.float32
    assert np.abs(normalised.numpy() - expected).max() < 1e-5


def test_crop_flip_draws_every_crop_and_flip_of_the_paper_augmentation():
    """RandomCrop + HorizontalFlip + VerticalFlip: each output is one in-bounds crop, flipped or not, and
    over seeds every position and flip combination occurs; the same seed gives the same output."""
    import numpy as np
    import pytest

    from covidct.data.transforms import CropFlip

    image = np.arange(10 * 12 * 3, dtype=np.uint8).reshape(10, 12, 3)
    candidates = {}
    for top in range(3):
        for left in range(5):
            crop = image[top : top + 8, left : left + 8]
            for flip_v in (False, True):
                for flip_h in (False, True):
                    flipped = crop[:: -1 if flip_v else 1, :: -1 if flip_h else 1]
                    candidates[(top, left, flip_v, flip_h)] = flipped.transpose(2, 0, 1).tobytes()
    by_output = {v: k for k, v in candidates.items()}
    assert len(by_output) == 60  # the test image tells every arrangement apart
    augment = CropFlip("train", 8)
    seen = Counter()
    for seed in range(1000):
        augment.set_random_seed(seed)
        out = augment(image)
        assert out.shape == (3, 8, 8) and out.flags.c_contiguous
        seen[by_output[out.tobytes()]] += 1
    assert set(seen) == set(candidates)
    assert 0.4 < sum(n for (_, _, _, flip_h), n in seen.items() if flip_h) / 1000 < 0.6
    augment.set_random_seed(5)
    first = augment(image)
    augment.set_random_seed(5)
    assert np.array_equal(first, augment(image))
    assert np.array_equal(CropFlip("eval", 8)(image[:8, :8]), image[:8, :8].transpose(2, 0, 1))
    with pytest.raises(ValueError, match="cannot crop 16x16 from an image of 10x12"):
        CropFlip("train", 16)(image)


def test_cache_reader_is_np_load_and_a_truncated_entry_is_an_error(tmp_path: Path):
    import numpy as np
    import pytest

    from covidct.data.cache import read_npy

    arrays = {
        "cached": np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8),
        "float": np.ones((2, 3), np.float32),
        "fortran": np.asfortranarray(np.zeros((4, 5, 3), np.uint8)),
    }
    for name, array in arrays.items():
        np.save(tmp_path / f"{name}.npy", array)
        read = read_npy(tmp_path / f"{name}.npy")
        assert read.dtype == array.dtype and np.array_equal(read, array)
    truncated = tmp_path / "cached.npy"
    truncated.write_bytes(truncated.read_bytes()[:-10])
    with pytest.raises(ValueError):
        read_npy(truncated)  # DecodedImageCache.get decodes the image again


def test_cached_resizes_are_the_authors_torchvision_pil_resize(real_data: Path, tmp_path: Path):
    """Resize(256) before the training crop and Resize((224, 224)) for evaluation, as the authors' torchvision
    pipeline gives them on PIL images (antialiased when shrinking), on site B's largest and smallest images."""
    import numpy as np
    from PIL import Image
    from torchvision import transforms

    from covidct.data.cache import DecodedImageCache

    cache = DecodedImageCache(tmp_path, image_size=224)
    largest, smallest = "2020.02.25.20027763-p15-53%0.png", "2020.02.25.20021568-p24-111%7.png"  # MANIFEST.tsv
    for name in (largest, smallest):
        path = real_data / "covid-ct" / "CT_COVID" / name
        with Image.open(path) as image:
            rgb = image.convert("RGB")
            expected = {
                "train": np.asarray(transforms.Resize(256)(rgb), dtype=np.float64),
                "eval": np.asarray(transforms.Resize((224, 224))(rgb), dtype=np.float64),
            }
        for kind, reference in expected.items():
            ours = cache.get(path, kind)
            assert ours.shape == reference.shape, (path, kind)
            assert np.abs(ours - reference).mean() < 0.05, (path, kind)


def test_repeat_factors_are_per_site_and_auto_evens_the_sites_passes(real_data: Path, tmp_path: Path):
    def datamodule(repeat) -> SiteDataModule:
        dm = SiteDataModule(real_data, repeat=repeat, num_workers=0, cache_dir=tmp_path)
        dm.split_data()  # no image decoded
        return dm

    paper, auto, none = datamodule(None), datamodule("auto"), datamodule({})  # None: the paper's {B: 4}
    n_a, n_b = (len(paper.splits[site]["train"]) for site in ("A", "B"))
    assert (n_a, n_b) == (1860, 559)  # fold 0
    assert paper.repeat_factors() == [1, 4] and none.repeat_factors() == [1, 1]
    assert auto.repeat_factors() == [1, round(n_a / n_b)] == [1, 3]  # the paper's 4x is set, not derived
    for dm, longest in ((paper, 4 * n_b), (auto, n_a), (none, n_a)):
        assert len(dm.train_dataloader()) == math.ceil(longest / 16)
