"""A site-specific network's layers for a site it never saw in training.

DSBN's BatchNorms and the adapters' 1x1 convolutions hold one copy per training site, so a site outside
that list has none: which copy it gets must be chosen, and is recorded.
- `site:<name>`: a trained site's copies, as if the new site were that one;
- `mean`: the average of the sites' statistics, affine parameters and adapter weights;
- `adabn` (Li et al. 2016, "Revisiting Batch Normalization For Practical Domain Adaptation"): the mean's
  affine parameters and adapter weights, with BatchNorm statistics re-estimated on the new site's own
  (unlabelled) images: each BatchNorm's input mean and variance over all of them (estimate_unseen_statistics), so
  the same for any batch size, as evaluate, predict and a leave-one-site-out run each batch them.
Layers with one copy shared by two or more sites (Joint's norms) serve every site as they are; with one
training site (leave-one-site-out of two) every routed layer is that site's, so `adabn` re-estimates them all.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from covidct.errors import ConfigError
from covidct.models.adapters import SiteConv1x1
from covidct.models.norms import SiteBatchNorm
from covidct.models.routing import SiteBlocks

UNSEEN_NORMS = ("adabn", "mean", "site:<name>")
SHARED = "shared"  # the choice of a model whose layers its sites share: it classifies any site as it is


def _routed(net: nn.Module) -> list[nn.ModuleList]:
    """The site-routed module lists of `net` (BatchNorms and adapter convolutions), one copy per site or one."""
    lists = []
    for module in net.modules():
        if isinstance(module, SiteBatchNorm):
            lists.append(module.norms)
        elif isinstance(module, SiteConv1x1):
            lists.append(module.convs)
    return lists


def _site_specific(net: nn.Module, n_sites: int) -> list[nn.ModuleList]:
    """The lists holding one copy per training site (with one site: every routed list)."""
    return [copies for copies in _routed(net) if len(copies) == n_sites]


def has_routed_copies(net: nn.Module, n_sites: int) -> bool:
    """Whether `net` has layers with one copy per each of `n_sites` training sites (what an unseen site needs)."""
    return bool(_site_specific(net, n_sites))


def has_site_copies(net: nn.Module) -> bool:
    """Whether `net` has layers with a copy per site (else it serves any site as it is)."""
    return any(len(copies) > 1 for copies in _routed(net))


def _average(copies: Sequence[nn.Module]) -> nn.Module:
    """A copy whose parameters and float buffers are the copies' averages (BN statistics included)."""
    mean = copy.deepcopy(copies[0])
    with torch.no_grad():
        states = [c.state_dict() for c in copies]
        for name, value in mean.state_dict().items():
            if value.is_floating_point():
                value.copy_(torch.stack([s[name] for s in states]).mean(dim=0))
    return mean


def add_unseen_site(net: nn.Module, how: str, sites: Sequence[str]) -> int:
    """Give every site-specific layer of `net` one more copy, built as `how` says, and return its index (the
    site index to route the unseen site's images with). `adabn` copies still need their statistics:
    estimate_unseen_statistics."""
    borrowed: int | None = None
    if how.startswith("site:"):
        name = how.split(":", 1)[1]
        if name not in sites:
            raise ConfigError(
                f"unseen_norm={how}: {name!r} is not a trained site; the trained sites are {list(sites)}."
            )
        borrowed = list(sites).index(name)
    elif how not in ("adabn", "mean"):
        raise ConfigError(f"unseen_norm must be one of {', '.join(UNSEEN_NORMS)}; got {how!r}.")
    specific = _site_specific(net, len(sites))
    if not specific:
        raise ConfigError(f"the network has no layer with one copy per site of {list(sites)}.")
    for copies in specific:
        unseen = copy.deepcopy(copies[borrowed]) if borrowed is not None else _average(list(copies))
        if how == "adabn" and isinstance(unseen, nn.modules.batchnorm._BatchNorm):
            unseen.reset_running_stats()
            unseen.momentum = None  # marks the copies estimate_unseen_statistics fills
        copies.append(unseen)
    return len(sites)


class _InputTaken(Exception):
    """Ends a forward pass once the BatchNorm being estimated has its input: the layers after it are not needed."""


class _PopulationMoments:
    """Per-channel mean and variance of every value a BatchNorm's input holds over all the batches added: sums in
    float64, shifted by the first batch's mean (so no cancellation), hence the same figures, to float precision,
    however the images are batched or ordered. torch keeps no streaming per-channel moments, hence this class."""

    def __init__(self) -> None:
        self.count = 0
        self.shift: torch.Tensor | None = None
        self.total: torch.Tensor | None = None
        self.squares: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        values = x.detach().double().transpose(0, 1).reshape(x.shape[1], -1)  # channels x (images, positions)
        if self.shift is None:
            self.shift = values.mean(dim=1, keepdim=True)
            self.total = torch.zeros_like(self.shift)
            self.squares = torch.zeros_like(self.shift)
        centred = values - self.shift
        self.total += centred.sum(dim=1, keepdim=True)
        self.squares += centred.square().sum(dim=1, keepdim=True)
        self.count += values.shape[1]

    def mean_and_variance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and the unbiased variance (BatchNorm's running_var convention)."""
        centred_mean = self.total / self.count
        variance = (self.squares - self.count * centred_mean.square()) / max(self.count - 1, 1)
        return (self.shift + centred_mean).squeeze(1), variance.squeeze(1)


@torch.no_grad()
def estimate_unseen_statistics(
    net: nn.Module, batches: Iterable[torch.Tensor], forward: Callable[[torch.Tensor], torch.Tensor]
) -> int:
    """AdaBN with exact population statistics: each of the unseen site's BatchNorms gets the mean and variance of
    its input over all of `batches` (the site's images), with every BatchNorm before it already fixed at its own,
    so the estimate is the same for any batch size or order (a BatchNorm left in training mode would normalise by
    each batch's statistics, and everything after it would depend on how the images were batched). `forward` is
    the network on a batch of the unseen site, routed to its index, with every layer in eval mode.

    One pass over the images per BatchNorm, in the order the forward reaches them, each pass stopped at that
    BatchNorm's input (a forward pre-hook): about two thirds of a forward per BatchNorm (measured on one shared CPU
    core, 500 images at 64 px in batches of 64, width 0.25: one forward 1 s; 5 s for Ours' 7 unseen BatchNorms,
    18 s for parallel adapters' 23, 36 s for series adapters' 43). The batches are kept in memory meanwhile
    (3 x S x S floats an image: 0.6 GB for 1000 images at 224 px), so a folder of images is decoded once. Unseen
    BatchNorms the forward never reaches (a projection head's) keep their reset statistics.
    Returns the number of images seen."""
    unseen = [
        copies[-1]
        for copies in _routed(net)
        if len(copies) > 1 and isinstance(copies[-1], nn.modules.batchnorm._BatchNorm) and copies[-1].momentum is None
    ]
    batches = list(batches)
    was_training = net.training
    net.eval()
    pending = list(unseen)
    while pending:
        norm, moments = _first_reached_input(pending, batches, forward)
        if norm is None:
            break
        mean, variance = moments.mean_and_variance()
        norm.running_mean.copy_(mean)
        norm.running_var.copy_(variance)
        pending.remove(norm)
    for norm in unseen:
        norm.momentum = 0.1
    net.train(was_training)
    return sum(len(batch) for batch in batches)


def _first_reached_input(
    norms: Sequence[nn.Module], batches: Sequence[torch.Tensor], forward: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[nn.Module | None, _PopulationMoments]:
    """The first of `norms` the forward reaches (None: none is on its path) and its input's moments over all
    `batches`, each forward stopped there."""
    moments = _PopulationMoments()
    first: list[nn.Module] = []

    def take(norm: nn.Module, x: torch.Tensor) -> None:
        if not first:
            first.append(norm)
        if norm is not first[0]:
            raise RuntimeError("the unseen site's BatchNorms are reached in another order from batch to batch")
        moments.add(x)

    with _stopped_at(norms, take):
        for batch in batches:
            with contextlib.suppress(_InputTaken):
                forward(batch)
            if not first:
                break  # the forward ran through
    return (first[0] if first else None), moments


@contextlib.contextmanager
def _stopped_at(norms: Sequence[nn.Module], take: Callable[[nn.Module, torch.Tensor], object]) -> Iterator[None]:
    """While inside: a forward that reaches one of `norms` hands it its input (`take`) and raises _InputTaken."""

    def stop(norm: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        take(norm, args[0])
        raise _InputTaken

    hooks = [norm.register_forward_pre_hook(stop) for norm in norms]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def unseen_choices(method: nn.Module) -> list[str]:
    """The norms a site a method (a SiteMethod: its `sites`, `networks_per_site`) never saw can be classified
    with, in the order records list them: a network per site (Single) only
    borrows one; site-specific layers (or, with one training site, all routed layers) take adabn, mean or a
    trained site's copies; layers shared by several sites serve any site as they are."""
    if method.networks_per_site:
        return [f"site:{site}" for site in method.sites]
    if not has_routed_copies(method, len(method.sites)):
        return [SHARED]
    return ["adabn", "mean", *(f"site:{site}" for site in method.sites)]


def check_choice(method: nn.Module, how: str) -> None:
    allowed = unseen_choices(method)
    if how not in allowed:
        raise ConfigError(
            f"unseen_norm={how} does not apply to {type(method).__name__} trained on site(s) "
            f"{', '.join(method.sites)}: choose one of {', '.join(allowed)}."
        )


def unseen_site_model(
    method: nn.Module, how: str, images: Callable[[], Iterable[torch.Tensor]], in_place: bool = False
) -> tuple[nn.Module, int, int]:
    """A method (a SiteMethod) that classifies a site it never saw as `how` says, the site index to route that
    site's images with, and the number of images `adabn` estimated its statistics on (`images()`: normalised
    batches of the site, labels unused). A copy, unless `in_place`; borrowed networks and shared layers need
    none."""
    check_choice(method, how)
    if how == SHARED:
        return method, 0, 0
    if method.networks_per_site:
        return method, list(method.sites).index(how.split(":", 1)[1]), 0
    net = method if in_place else copy.deepcopy(method).eval()
    index = add_unseen_site(net, how, method.sites)
    if how != "adabn":
        return net, index, 0
    route = SiteBlocks.single(index)
    return net, index, estimate_unseen_statistics(net, images(), lambda batch: net.logits(batch, route))
