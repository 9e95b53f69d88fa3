"""The multi-site batch sampler: every batch holds exactly `batch_per_site` images of each site."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import BatchSampler, Sampler, default_collate


class SiteEpochDraws(Sampler[tuple[int, int]]):
    """One epoch of this rank's draws, (index, augmentation seed) pairs in batch order, from (seed, epoch).

    Epoch length: ceil(max_s(repeat_s * n_s) / batch_per_site) steps. Each site draws from a stream of
    fresh random permutations of its images, cut to that length, so within one epoch a site with
    repeat r shows every image at least r times (exactly r, except for the < batch_per_site images
    that top up the last batch), and the other site is cycled to fill the same number of steps.
    The epoch's steps are dealt round-robin over the ranks.

    This is the batch sampler's `sampler`, as a DistributedSampler sits inside a BatchSampler, because
    that is where loops look for `set_epoch`: Lightning calls `dataloader.batch_sampler.sampler.set_epoch`
    at the start of every epoch (resumed epochs included), on every rank, never the batch sampler's own.
    """

    def __init__(
        self,
        site_indices: Sequence[Sequence[int]],
        repeats: Sequence[int],
        batch_per_site: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if len(site_indices) != len(repeats):
            raise ValueError("one repeat factor per site is needed")
        if batch_per_site < 1 or any(r < 1 for r in repeats):
            raise ValueError("batch_per_site and repeats must be positive")
        if any(len(ix) == 0 for ix in site_indices):
            raise ValueError("every site needs at least one training image")
        self.site_indices = [torch.as_tensor(list(ix), dtype=torch.long) for ix in site_indices]
        self.repeats = list(repeats)
        self.batch_per_site = batch_per_site
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.start = 0  # the epoch's first batch on this rank: > 0 once, in a run resumed mid-epoch

    @property
    def batch_size(self) -> int:
        return self.batch_per_site * len(self.site_indices)

    def steps(self) -> int:
        """Steps per epoch on this rank."""
        return math.ceil(self._global_steps() / self.world_size)

    def __len__(self) -> int:
        return self.steps() * self.batch_size

    def _global_steps(self) -> int:
        longest = max(r * len(ix) for r, ix in zip(self.repeats, self.site_indices))
        return math.ceil(longest / self.batch_per_site)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start = 0
        self.epoch = epoch

    def resume_at(self, epoch: int, batch: int) -> None:
        """The next iteration draws epoch `epoch` from its batch `batch` on (what a mid-epoch checkpoint saw next)."""
        self.epoch, self.start = epoch, batch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        steps = self._global_steps()
        need = steps * self.batch_per_site
        streams = []
        for indices in self.site_indices:
            passes = math.ceil(need / len(indices))
            order = torch.cat([indices[torch.randperm(len(indices), generator=generator)] for _ in range(passes)])
            streams.append(order[:need].tolist())
        b = self.batch_per_site
        seeds = torch.randint(0, 2**31 - 1, (steps, b * len(streams)), generator=generator).tolist()
        start, self.start = self.start, 0
        for k in range(start, self.steps()):
            step = (self.rank + k * self.world_size) % steps  # ranks short of a batch wrap to the start
            indices = [i for stream in streams for i in stream[step * b : (step + 1) * b]]
            yield from zip(indices, seeds[step])


class SiteBalancedBatchSampler(BatchSampler):
    """Batches of `batch_per_site` (index, augmentation seed) pairs from each site in turn (site order as given),
    cut from its epoch's draws by torch's BatchSampler (the draws are whole batches, so none is short).

    Orders and augmentation seeds depend only on (seed, epoch) (see SiteEpochDraws): a resumed or re-run
    epoch, with any number of loader workers, sees exactly the same images with exactly the same
    augmentations, and every epoch differs from the last.
    """

    def __init__(self, draws: SiteEpochDraws):
        super().__init__(draws, draws.batch_size, drop_last=False)


def site_layout_of(site: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(site of each block, size of each block) of a batch that holds one contiguous run per site, else None.

    Every batch of this sampler has that layout (and every eval batch, which holds one site); models route
    such batches by slicing (models/routing.py). Read in the DataLoader's collate, on the CPU, for free.
    """
    sites: list[int] = []
    sizes: list[int] = []
    for value in site.tolist():
        if sites and sites[-1] == value:
            sizes[-1] += 1
        elif value in sites:
            return None
        else:
            sites.append(value)
            sizes.append(1)
    return (tuple(sites), tuple(sizes)) if sites else None


def collate_with_site_layout(samples: list[dict[str, Any]]) -> dict[str, Any]:
    batch = default_collate(samples)
    batch["site_layout"] = site_layout_of(batch["site"])
    return batch
