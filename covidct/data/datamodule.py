"""The two-site LightningDataModule: folds, cached decoding, augmentation and 16+16 batches."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from covidct.data.cache import DecodedImageCache, default_cache_dir
from covidct.data.folds import FEW_IMAGES_PER_CLASS, N_FOLDS, split_fold, validation_rounding
from covidct.data.sampler import SiteBalancedBatchSampler, SiteEpochDraws, collate_with_site_layout
from covidct.data.sites import PAPER_SITES, SiteSpec, checked_repeat, split_sites
from covidct.data.sources import Sample, list_site, scan_site
from covidct.data.transforms import IMAGENET_MEAN, IMAGENET_STD, CropFlip, normalize_images
from covidct.errors import ConfigError

log = logging.getLogger("covidct.data")


def init_loader_worker(worker_id: int) -> None:
    """Loader workers hand batches over by shared-memory file name, not file descriptor: each descriptor
    costs the main process a socket connection, about 40% of its CPU time per batch on the development CPU
    (torch's shm manager still removes the files if a process dies). They ignore Ctrl-C, which reaches the
    whole process group: the main process saves a checkpoint after the step, then stops them. Not SIGTERM:
    torch's loader ends a worker that does not stop by itself with SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if "file_system" in torch.multiprocessing.get_all_sharing_strategies():
        torch.multiprocessing.set_sharing_strategy("file_system")


class TrainLoader(DataLoader):
    """The training loader, which knows where in its epoch it is. Lightning checkpoints its `state_dict` (the seed,
    the epoch and the batch it hands out next) and gives it to a resumed run's loader, so that run continues with
    exactly that batch; an epoch-end checkpoint's next epoch starts at its first batch (the sampler's set_epoch).

    Its sampler is read when the first batch is requested, not when Lightning asks for an iterator (which
    happens before it sets a resumed run's epoch), so loader workers never prefetch the wrong epoch.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._epoch = self._position = 0

    def __iter__(self) -> Iterator[Any]:
        draws = self.batch_sampler.sampler
        self._epoch, self._position = draws.epoch, draws.start
        for batch in super().__iter__():
            self._position += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.batch_sampler.sampler.seed, "epoch": self._epoch, "batch": self._position}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        draws = self.batch_sampler.sampler
        if state_dict["seed"] != draws.seed:
            log.warning(
                "the checkpoint drew its batches with seed %s; this run continues with seed %s",
                state_dict["seed"],
                draws.seed,
            )
        draws.resume_at(int(state_dict["epoch"]), int(state_dict["batch"]))


class SiteImageDataset(Dataset):
    """Samples of one or more sites, as dicts of image, label, site index and file name.

    Training items are requested as (index, augmentation seed) pairs from the batch sampler, so each
    drawn sample's augmentation is reproducible whatever the worker; evaluation items are plain indices.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        kind: str,
        cache: DecodedImageCache,
        augment: CropFlip,
        site_ids: Mapping[str, int],
        windows: Mapping[str, Sequence[float]],
    ):
        self.samples = list(samples)
        self.site_ids = dict(site_ids)  # a site's index: its place in the training sites (see DataModule)
        self.kind = kind
        self.cache = cache
        self.augment = augment
        self.windows = [windows[s.site] for s in self.samples]  # each site's DICOM window
        self.entries = [cache.entry(s.path, kind, w) for s, w in zip(self.samples, self.windows)]  # once, not per read

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        if isinstance(item, tuple):
            item, augmentation_seed = item
            self.augment.set_random_seed(augmentation_seed)
        sample = self.samples[item]
        image = self.augment(self.cache.get(sample.path, self.kind, self.entries[item], self.windows[item]))
        return {
            "image": torch.from_numpy(image),  # uint8 CHW, normalised on the device (on_after_batch_transfer)
            "label": sample.label,
            "site": self.site_ids[sample.site],
            "file": sample.name,
        }


class SiteDataModule(pl.LightningDataModule):
    """The sites' folds; training batches of `batch_per_site` images per site; per-site eval loaders.

    `sites` names the sites by their config (data/sites.py), or `site_specs` gives them (as a checkpoint
    stores them); a site file's folder must lie under `root` unless `allow_outside_root`. `test_sites` are sites
    never trained on (leave-one-site-out): all their images are tested, with an index past the training sites',
    and `sites` (what a method is built for) holds the others.

    An epoch is ceil(max_s(repeat_s * n_s) / batch_per_site) steps over the training parts (see
    SiteEpochDraws), where `repeat` gives each site's passes per epoch: a mapping (sites left out pass once;
    the paper's {B: 4}) or 'auto', the nearest integer that makes every site's passes cover about as many
    images as the largest site's. A site's factor holds whatever the other sites, so Single's single-site mode
    `sites=[B]` trains site B for as many steps per epoch as the two-site run; `sites=[A]` shows site A
    once per epoch, where the two-site run cycles it to site B's length (the record notes it).
    """

    def __init__(
        self,
        root: str | Path,
        sites: Sequence[str] = PAPER_SITES,
        fold: int = 0,
        split_seed: int = 0,
        group_by: str = "patient",
        val_fraction: float = 0.0,
        image_size: int = 224,
        batch_per_site: int = 16,
        repeat: Mapping[str, int] | str | None = None,
        eval_batch_size: int = 64,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        cache_dir: str | Path | None = None,
        seed: int = 0,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        test_sites: Sequence[str] = (),
        site_specs: Mapping[str, Mapping[str, Any]] | None = None,
        allow_outside_root: bool = False,
    ):
        super().__init__()
        root = str(Path(os.path.expanduser(str(root))).absolute())  # stored absolute: explain runs anywhere
        self.save_hyperparameters()  # stored in checkpoints: predict and explain reuse the preprocessing
        sites, test_sites = [str(s) for s in sites], [str(s) for s in test_sites]
        trained, held = split_sites(sites, test_sites, site_specs, allow_outside_root=allow_outside_root)
        self.specs: dict[str, SiteSpec] = {spec.name: spec for spec in (*trained, *held)}
        self.sites = [spec.name for spec in trained]
        self.unseen_sites = [spec.name for spec in held]
        # stored by name, with their specs: a checkpoint rebuilds its sites on any machine, without the files
        self.hparams.update(sites=self.sites, test_sites=self.unseen_sites)
        self.hparams["site_specs"] = {name: spec.as_dict() for name, spec in self.specs.items()}
        self.root = Path(root)
        self.fold = fold
        self.split_seed = split_seed
        self.group_by = group_by
        self.val_fraction = val_fraction
        if validation_rounding(val_fraction):
            log.warning(
                "data.val_fraction=%s is no 1/k: the validation part is %s",
                val_fraction,
                validation_rounding(val_fraction),
            )
        self.image_size = image_size
        self.batch_per_site = batch_per_site
        self.repeat = checked_repeat(repeat, list(self.specs.values()))
        self.eval_batch_size = eval_batch_size
        self.num_workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.cache = DecodedImageCache(cache_dir or default_cache_dir(), image_size)
        self.seed = seed
        self.mean, self.std = tuple(mean), tuple(std)
        self.splits: dict[str, dict[str, list[Sample]]] = {}
        self.unread: dict[str, list[str]] = {}  # site -> what its folder holds that is not read
        self._warmed = False

    def setup(self, stage: str | None = None) -> None:
        """The folds, then every image decoded into the cache (once per DataModule)."""
        if self._warmed:
            return
        self.split_data()
        self.cache.warm(self._cache_items(), workers=self.num_workers)
        self._warmed = True

    def split_data(self) -> None:
        """Scan the sites and draw the folds, without decoding any image (enough for `fingerprint`)."""
        if self.splits:
            return
        for site in self.sites:
            samples = self._scan(site)
            self.splits[site] = split_fold(samples, self.fold, self.split_seed, self.val_fraction)
            n_train = len(self.splits[site]["train"])
            if n_train < self.batch_per_site:
                raise ConfigError(
                    f"site {site} has {n_train} training images in fold {self.fold}, fewer than "
                    f"data.batch_per_site={self.batch_per_site}; lower data.batch_per_site."
                )
            for part, samples in self.splits[site].items():
                covid = sum(s.label for s in samples)
                if samples and min(covid, len(samples) - covid) < FEW_IMAGES_PER_CLASS:
                    log.warning(
                        "site %s, fold %d: the %s part holds %d COVID and %d non-COVID images; metrics of a "
                        "class with no image are recorded as undefined (null)",
                        site,
                        self.fold,
                        part,
                        covid,
                        len(samples) - covid,
                    )
        for site in self.unseen_sites:  # never trained on: every image is a test image
            self.splits[site] = {"train": [], "val": [], "test": self._scan(site)}

    def _scan(self, site: str) -> list[Sample]:
        """A site's samples; what its folder holds unread (subfolders of a class folder, broken symlinks, ...) is
        logged and kept for the record's notes, as `data check` lists it (the same walk, sources.list_site)."""
        listing = list_site(self.root, self.specs[site])
        if listing.unread:
            self.unread[site] = listing.unread
            log.warning(
                "site %s: %d entr%s of its folder not read (first: %s); `python -m covidct.data check` lists all",
                site,
                len(listing.unread),
                "y" if len(listing.unread) == 1 else "ies",
                listing.unread[0],
            )
        return scan_site(self.root, self.specs[site], self.group_by, listing)

    def _cache_items(self) -> list[tuple[Path, str, tuple[float, float]]]:
        """Every image with the resize its part uses (training crops from 'train', evaluation uses 'eval') and
        its site's DICOM window."""
        return [
            (s.path, "train" if part == "train" else "eval", self.specs[site].window)
            for site, parts in self.splits.items()
            for part, items in parts.items()
            for s in items
        ]

    def _loader(self, dataset: Dataset, loader: type[DataLoader] = DataLoader, **kwargs: Any) -> DataLoader:
        workers = self.num_workers
        return loader(
            dataset,
            num_workers=workers,
            pin_memory=self.pin_memory,
            persistent_workers=workers > 0,
            worker_init_fn=init_loader_worker,
            collate_fn=collate_with_site_layout,
            **kwargs,
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Normalise on the device the batch has reached: the workers ship uint8."""
        batch["image"] = normalize_images(batch["image"], self.mean, self.std)
        return batch

    def train_dataloader(self) -> DataLoader:
        samples: list[Sample] = []
        site_indices = []
        for site in self.sites:
            part = self.splits[site]["train"]
            site_indices.append(range(len(samples), len(samples) + len(part)))
            samples.extend(part)
        repeats = self.repeat_factors()
        dataset = SiteImageDataset(
            samples, "train", self.cache, CropFlip("train", self.image_size), self.site_ids(), self._windows()
        )
        trainer = self.trainer
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        draws = SiteEpochDraws(site_indices, repeats, self.batch_per_site, self.seed, rank, world_size)
        return self._loader(dataset, TrainLoader, batch_sampler=SiteBalancedBatchSampler(draws))

    def site_ids(self) -> dict[str, int]:
        """Each training site's index in batches and site-routed layers: its place in `sites`."""
        return {site: i for i, site in enumerate(self.sites)}

    def _windows(self) -> dict[str, tuple[float, float]]:
        return {name: spec.window for name, spec in self.specs.items()}

    def _site_loader(self, site: str, part: str, index: int) -> DataLoader:
        augment = CropFlip("eval", self.image_size)
        dataset = SiteImageDataset(self.splits[site][part], "eval", self.cache, augment, {site: index}, self._windows())
        return self._loader(dataset, batch_size=self.eval_batch_size, shuffle=False)

    def _eval_loaders(self, part: str) -> list[DataLoader]:
        return [self._site_loader(site, part, i) for i, site in enumerate(self.sites) if self.splits[site][part]]

    def unseen_loader(self, site: str, index: int) -> DataLoader:
        """A test site never trained on, its batches routed to `index` (the layers it was given)."""
        return self._site_loader(site, "test", index)

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("val")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("test")

    def fingerprint(self) -> dict[str, dict[str, str]]:
        """What a run trains and tests on, per site and part: a hash of the sorted (file, size, label, group)
        lines. Resume and skip compare it, so changed data never mixes into a run's folds or results."""
        self.split_data()
        prints: dict[str, dict[str, str]] = {}
        for site, parts in self.splits.items():
            prints[site] = {}
            for part, samples in parts.items():
                lines = sorted(f"{s.name}\t{s.path.stat().st_size}\t{s.label}\t{s.group}" for s in samples)
                prints[site][part] = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]
        return prints

    def repeat_factors(self) -> list[int]:
        """Each site's passes over its training images per epoch, in site order."""
        if self.repeat != "auto":
            return [self.repeat.get(site, 1) for site in self.sites]
        sizes = [len(self.splits[site]["train"]) for site in self.sites]
        return [max(1, round(max(sizes) / n)) for n in sizes]

    def has_validation(self) -> bool:
        return any(parts["val"] for parts in self.splits.values())

    def test_patients(self) -> dict[tuple[str, str], str]:
        """(site, file) -> patient id ('' where unknown) of every test image."""
        return {(site, s.name): s.patient for site, parts in self.splits.items() for s in parts["test"]}

    def split_summary(self) -> dict[str, Any]:
        """Counts per site and part, and how folds were grouped: part of every run record."""
        summary: dict[str, Any] = {
            "fold": self.fold,
            "n_folds": N_FOLDS,
            "split_seed": self.split_seed,
            "group_by": self.group_by,
            "val_fraction": self.val_fraction,
            "sites": {},
        }
        for site, parts in self.splits.items():
            summary["sites"][site] = {
                part: {
                    "images": len(items),
                    "covid": sum(s.label for s in items),
                    "groups": len({s.group for s in items}),
                }
                for part, items in parts.items()
            }
        notes = []
        held_out = {site: len(parts["val"]) for site, parts in self.splits.items() if parts["val"]}
        if held_out:
            cost = ", ".join(f"site {site} {n}" for site, n in held_out.items())
            rounded = validation_rounding(self.val_fraction)
            notes.append(
                f"validation part (data.val_fraction={self.val_fraction}{': ' + rounded if rounded else ''}) held out "
                f"of training for checkpoint selection: {cost} training images fewer than the paper's protocol"
            )
        else:
            notes.append("the paper's protocol: trained on all non-test images (no validation part)")
        if len(self.sites) == 1 and not self.unseen_sites and isinstance(self.repeat, dict):
            others = [site for site in self.repeat if site not in self.sites]
            if others and self.repeat.get(self.sites[0], 1) == 1:
                notes.append(
                    f"single-site mode: site {self.sites[0]} is shown once per epoch; a two-site run cycles it to "
                    f"the length of site {others[0]}'s {self.repeat[others[0]]} passes, so these epochs are shorter"
                )
        for site, unread in self.unread.items():
            notes.append(  # counted, not named: a folder-kind site's paths name its patients (run.log names one)
                f"site {site}: {len(unread)} entries of its folder not read (`python -m covidct.data check` lists them)"
            )
        if self.group_by == "image":
            notes.append("folds are image-level on every site")
        else:
            notes.extend(self.specs[site].note(self.group_by) for site in self.sites)
        if self.unseen_sites:
            summary["test_sites"] = list(self.unseen_sites)
            notes.append(
                f"leave-one-site-out: site(s) {', '.join(self.unseen_sites)} never trained on, all their images "
                "tested, with the norms `unseen` names (adabn, mean, site:<name>) where a method's are per site"
            )
        summary["notes"] = notes
        return summary
