"""Layers for a site never seen in training, against their definitions: borrowed, averaged, or AdaBN."""

import pytest
import torch

from covidct.errors import ConfigError
from covidct.models import CovidNet
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


def test_adabn_statistics_are_the_unseen_site_s_own_and_the_trained_sites_keep_theirs():
    net = _trained()
    trained = [n.running_mean.clone() for n in net.stem_norm.norm.norms]
    index = add_unseen_site(net, "adabn", SITES)
    images = torch.randn(6, 3, 64, 64) * 3 - 2  # darker and wider than both training sites
    seen_inputs = []
    hook = net.stem_norm.norm.norms[index].register_forward_hook(lambda m, args, out: seen_inputs.append(args[0]))
    n = estimate_unseen_statistics(net, [images[:3], images[3:]], lambda b: net(b, SiteBlocks.single(index)))
    hook.remove()
    assert n == 6
    # the first DSBN layer's input does not depend on any BN: its statistics are exactly the batches' average
    assert len(seen_inputs) == 2
    means = torch.stack([t.mean(dim=(0, 2, 3)) for t in seen_inputs]).mean(dim=0)
    variances = torch.stack([t.var(dim=(0, 2, 3), unbiased=True) for t in seen_inputs]).mean(dim=0)
    unseen = net.stem_norm.norm.norms[index]
    assert torch.allclose(unseen.running_mean, means, atol=1e-5)
    assert torch.allclose(unseen.running_var, variances, rtol=1e-4)
    assert not torch.allclose(unseen.running_mean, trained[1], atol=1e-2)
    assert not unseen.training and unseen.momentum == 0.1 and not net.training
    assert all(torch.equal(n.running_mean, m) for n, m in zip(net.stem_norm.norm.norms[:2], trained))


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
