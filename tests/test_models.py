import torch

from covidct.models import CovidNet, SiteBatchNorm, projection_head


def _count(module: torch.nn.Module, keep=lambda name: True) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if keep(n))


def test_redesigned_parameter_counts_match_the_authors_model():
    net = CovidNet(redesign=True, num_sites=2)
    head = projection_head(net.embedding_dim, num_sites=2)
    trunk = _count(net, lambda n: "norm" not in n and not n.startswith("classifier"))
    classifier = _count(net.classifier, lambda n: "norm" not in n)
    bn = _count(net, lambda n: "norm" in n) + _count(head, lambda n: "norm" in n)
    assert trunk == 31_489_296
    assert classifier == 8_652_546
    assert _count(head, lambda n: "norm" not in n) == 8_520_832
    assert bn == 25_344
    assert _count(net) + _count(head) == 48_688_018


def test_shapes_redesigned_and_original():
    x, site = torch.randn(4, 3, 224, 224), torch.tensor([0, 0, 1, 1])
    net = CovidNet(redesign=True, num_sites=2, width=0.25)
    assert net.features(x, site).shape == (4, 512 * 4) and net(x, site).shape == (4, 2)
    original = CovidNet(redesign=False, image_size=224, width=0.25)
    assert original.embedding_dim == 512 * 7 * 7 and original(x, site).shape == (4, 2)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in original.modules())
    assert CovidNet(redesign=False, image_size=64, width=0.25).embedding_dim == 512 * 2 * 2
    small = CovidNet(redesign=True, width=0.125)
    assert small(torch.randn(3, 3, 64, 64), torch.zeros(3, dtype=torch.long)).shape == (3, 2)


def test_original_full_width_embedding():
    assert CovidNet(redesign=False, image_size=224).embedding_dim == 7 * 7 * 2048


def test_dsbn_keeps_separate_running_statistics_per_site():
    bn = SiteBatchNorm(3, num_sites=2)
    bn.train()
    x = torch.randn(8, 3, 4, 4) * 5 + 10
    bn(x, torch.zeros(8, dtype=torch.long))
    assert not torch.allclose(bn.norms[0].running_mean, torch.zeros(3))
    assert torch.equal(bn.norms[1].running_mean, torch.zeros(3))
    assert bn.norms[1].num_batches_tracked == 0 and bn.norms[0].num_batches_tracked == 1
    # a mixed batch: each site's statistics come from its own samples only
    mixed = torch.cat([torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4) + 100])
    site = torch.tensor([0] * 4 + [1] * 4)
    before = bn.norms[0].running_mean.clone()
    out = bn(mixed, site)
    assert bn.norms[1].running_mean.mean() > 9  # 0.1 * 100 from site B's samples alone
    assert (bn.norms[0].running_mean - before).abs().max() < 2
    assert torch.allclose(out[:4].mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(out[4:].mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)


def test_dsbn_uses_each_samples_own_site_at_test_time():
    bn = SiteBatchNorm(2, num_sites=2).eval()
    bn.norms[0].running_mean.fill_(1.0)
    bn.norms[1].running_mean.fill_(-3.0)
    x = torch.zeros(4, 2, 1, 1)
    out = bn(x, torch.tensor([1, 0, 1, 0]))
    assert torch.allclose(out[[1, 3]], torch.full((2, 2, 1, 1), -1.0), atol=1e-4)
    assert torch.allclose(out[[0, 2]], torch.full((2, 2, 1, 1), 3.0), atol=1e-4)


def test_mixed_batch_equals_per_site_forward_at_eval():
    torch.manual_seed(0)
    net = CovidNet(redesign=True, num_sites=2, width=0.125)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
            module.running_mean.uniform_(-1, 1)
    net.eval()
    x = torch.randn(4, 3, 64, 64)
    site = torch.tensor([0, 1, 1, 0])
    together = net(x, site)
    apart = torch.cat([net(x[i : i + 1], site[i : i + 1]) for i in range(4)])
    assert torch.allclose(together, apart, atol=1e-5)
    assert not torch.allclose(net(x, torch.zeros(4, dtype=torch.long)), together, atol=1e-3)


def test_single_sample_site_in_a_training_batch_is_a_clear_error():
    import pytest

    net = CovidNet(redesign=True, num_sites=2, width=0.125).train()
    with pytest.raises(ValueError, match="single sample"):
        net(torch.randn(3, 3, 64, 64), torch.tensor([0, 0, 1]))


def _dense_features(net: CovidNet, x: torch.Tensor, site: torch.Tensor) -> torch.Tensor:
    """COVID-Net's trunk written as its definition reads: every PEPX block after a stage's first takes
    the shortcut plus the sum of all earlier outputs of its stage; the next stage starts from the sum of
    the max-pooled outputs and shortcut."""
    import torch.nn.functional as F

    x = F.max_pool2d(net.stem_norm(net.stem(x), site), 2)
    block_input, shortcut = x, net.upper_norms[0](net.upper[0](x, site), site)
    for k, stage in enumerate(net.stages):
        outputs = []
        for j, block in enumerate(stage):
            outputs.append(block(block_input if j == 0 else shortcut + sum(outputs), site))
        if k + 1 < len(net.stages):
            next_shortcut = F.max_pool2d(
                net.upper_norms[k + 1](net.upper[k + 1](shortcut + sum(outputs), site), site), 2
            )
            block_input = sum(F.max_pool2d(t, 2) for t in [*outputs, shortcut])
            shortcut = next_shortcut
    return torch.flatten(net.pool(outputs[-1]), 1)


def test_the_trunk_computes_the_dense_connections_of_its_definition():
    torch.manual_seed(0)
    net = CovidNet(redesign=True, num_sites=2, width=0.125, image_size=64).train()
    x, site = torch.randn(6, 3, 64, 64, requires_grad=True), torch.tensor([0, 0, 0, 1, 1, 1])
    definition, features = _dense_features(net, x, site), net.features(x, site)
    torch.testing.assert_close(features, definition, rtol=1e-4, atol=1e-5)
    direction = torch.randn_like(features)
    inputs = [x, *net.parameters()]
    expected = torch.autograd.grad((direction * definition).sum(), inputs, allow_unused=True)
    for got, want in zip(torch.autograd.grad((direction * features).sum(), inputs, allow_unused=True), expected):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)
