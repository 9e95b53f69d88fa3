"""Layers for a site never seen in training, against their definitions: borrowed, averaged, or AdaBN."""

import copy

import pytest
import torch

from covidct.errors import ConfigError
from covidct.models import CovidNet
from covidct.models.norms import SiteBatchNorm
from covidct.models.routing import SiteBlocks
from covidct.models.unseen import add_unseen_site, estimate_unseen_statistics

SITES = ["A", "B"]


def _trained(adapter: str = "none", num_sites: int = 2) -> CovidNet:
    """A narrow net whose sites' BatchNorms have seen different data (site B's images are brighter)."""
    torch.manual_seed(0)
    net = CovidNet(num_sites=num_sites, width=0.125, adapter=adapter)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            x = torch.cat([torch.randn(4, 3, 64, 64), torch.randn(4, 3, 64, 64) * 2 + 1])
            net(x, SiteBlocks((0, 1), (4, 4)) if num_sites == 2 else SiteBlocks.single(0))
        for p in net.parameters():  # the sites' affine parameters and adapters differ too
            p.add_(torch.randn_like(p) * 0.05)
    return net.eval()


def test_a_borrowed_site_normalises_the_unseen_site_exactly_as_that_site():
    net = _trained("series")
    x = torch.randn(3, 3, 64, 64)
    expected = net(x, SiteBlocks.single(1))
    unseen = add_unseen_site(net, "site:B", SITES)
    assert unseen == 2 and net.stem_norm.norm.num_sites == 3
    assert torch.equal(net(x, SiteBlocks.single(unseen)), expected)
    assert not torch.allclose(net(x, SiteBlocks.single(0)), expected)  # the other site's would differ


def test_mean_averages_every_site_s_statistics_affine_parameters_and_adapters():
    net = _trained("parallel")
    norms = net.stem_norm.norm.norms
    before = [(n.running_mean.clone(), n.running_var.clone(), n.weight.detach().clone()) for n in norms]
    convs = net.upper[0].adapter.convs
    weights = [c.weight.detach().clone() for c in convs]
    add_unseen_site(net, "mean", SITES)
    unseen = norms[2]
    assert torch.allclose(unseen.running_mean, (before[0][0] + before[1][0]) / 2)
    assert torch.allclose(unseen.running_var, (before[0][1] + before[1][1]) / 2)
    assert torch.allclose(unseen.weight, (before[0][2] + before[1][2]) / 2)
    assert torch.allclose(convs[2].weight, (weights[0] + weights[1]) / 2)
    assert all(torch.equal(n.running_mean, b[0]) for n, b in zip(norms[:2], before))  # the sites' own untouched


def _adabn(net: CovidNet, batches: list[torch.Tensor]) -> tuple[CovidNet, int, int]:
    net = copy.deepcopy(net)
    index = add_unseen_site(net, "adabn", SITES)
    return net, index, estimate_unseen_statistics(net, batches, lambda b: net(b, SiteBlocks.single(index)))


@pytest.mark.parametrize("adapter", ["none", "series"])
def test_adabn_statistics_are_each_norm_s_input_moments_over_all_the_unseen_site_s_images(adapter: str):
    """The definition: with the estimate in place, each unseen BatchNorm's input over all the images at once (in
    eval mode, every earlier BatchNorm at its estimate) has exactly its running mean and variance; the trained
    sites keep theirs."""
    trained = _trained(adapter)
    images = torch.randn(6, 3, 64, 64) * 3 - 2  # darker and wider than both training sites
    net, index, n = _adabn(trained, [images[:3], images[3:]])
    assert n == 6
    unseen = [m.norms[index] for m in net.modules() if isinstance(m, SiteBatchNorm)]
    inputs = {}
    hooks = [norm.register_forward_pre_hook(lambda m, args: inputs.__setitem__(m, args[0])) for norm in unseen]
    net(images, SiteBlocks.single(index))
    for hook in hooks:
        hook.remove()
    assert len(inputs) == len(unseen) > 1  # every one is on the classifier's path
    for norm in unseen:
        dims = [0, 2, 3] if inputs[norm].dim() == 4 else [0]
        assert torch.allclose(norm.running_mean, inputs[norm].mean(dim=dims), atol=1e-5, rtol=1e-5)
        assert torch.allclose(norm.running_var, inputs[norm].var(dim=dims), atol=1e-5, rtol=1e-4)
        assert not norm.training and norm.momentum == 0.1
    stem = net.stem_norm.norm.norms
    assert not torch.allclose(stem[index].running_mean, stem[1].running_mean, atol=1e-2)
    assert not net.training
    for mine, theirs in zip(stem[:2], trained.stem_norm.norm.norms):
        assert torch.equal(mine.running_mean, theirs.running_mean) and torch.equal(mine.running_var, theirs.running_var)


def test_adabn_does_not_depend_on_how_the_images_are_batched_or_ordered():
    trained = _trained("series")
    images = torch.randn(8, 3, 64, 64) * 3 - 2
    order = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    probabilities = []
    for batches in ([images], list(images.split(3)), list(images[order].split(5))):
        net, index, _ = _adabn(trained, batches)
        probabilities.append(net(images, SiteBlocks.single(index)).softmax(-1))
    assert all(torch.allclose(p, probabilities[0], atol=1e-6) for p in probabilities[1:])


def test_norms_shared_by_two_sites_get_no_copy_but_one_training_sites_norms_are_its_own():
    net = _trained(num_sites=1)
    with pytest.raises(ConfigError, match=r"no layer with one copy per site of \['A', 'B'\]"):
        add_unseen_site(net, "adabn", SITES)  # shared by A and B: they serve any site as they are
    x = torch.randn(2, 3, 64, 64)
    expected = net.eval()(x, SiteBlocks.single(0))
    index = add_unseen_site(net, "mean", ["A"])  # trained on A alone: every norm is A's, and gets a copy
    assert index == 1 and net.stem_norm.norm.num_sites == 2
    assert torch.equal(net(x, SiteBlocks.single(index)), expected)  # the mean of one copy is that copy


@pytest.mark.parametrize(
    "how, message",
    [("site:C", r"'C' is not a trained site; the trained sites are \['A', 'B'\]"), ("median", "must be one of adabn")],
)
def test_an_unknown_choice_is_refused_naming_the_valid_ones(how: str, message: str):
    with pytest.raises(ConfigError, match=message):
        add_unseen_site(_trained(), how, SITES)
