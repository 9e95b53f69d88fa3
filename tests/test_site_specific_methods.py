"""Series/Parallel Adapter and MS-Net: each mechanism against its definition."""

from pathlib import Path

import pytest
import torch

from covidct.models.adapters import AdaptedConv, SiteConv1x1
from covidct.training.fit import train
from tests.helpers import FAST, RecordingMSNet, compose_experiment, tiny_method


def _batch(sites: list[int]) -> dict:
    torch.manual_seed(0)
    n = len(sites)
    return {
        "image": torch.randn(n, 3, 64, 64),
        "label": torch.tensor([i % 2 for i in range(n)]),
        "site": torch.tensor(sites),
    }


def _site_b_state(model) -> dict[str, torch.Tensor]:
    """Every parameter and buffer owned by site B: adapters' convs[1] and BNs' norms[1]."""
    return {
        name: tensor.detach().clone()
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]
        if ".convs.1." in name or ".norms.1." in name
    }


@pytest.mark.parametrize("declared", [False, True], ids=["indexed", "blocks"])
@pytest.mark.parametrize("experiment", ["series_adapter", "parallel_adapter"])
def test_a_step_on_site_a_leaves_site_b_untouched(experiment, declared):
    """With indexed routing, and with the block routing of DataModule batches (here one block, site A)."""
    model = tiny_method(experiment)
    adapters = [m for m in model.modules() if isinstance(m, SiteConv1x1)]
    assert len(adapters) == 16 + 4  # every depthwise 3x3 and every upper-branch conv
    for adapter in adapters:  # leave the zero init, so a step on A would show up anywhere it leaked
        for conv in adapter.convs:
            torch.nn.init.normal_(conv.weight, std=0.01)
    before = _site_b_state(model)
    site_a_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".convs.0." in n}
    assert before and site_a_before
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-7)
    model.train()
    batch = _batch([0] * 6)
    if declared:
        batch["site_layout"] = ((0,), (6,))
    model.training_losses(batch)["loss"].backward()
    optimizer.step()
    after = _site_b_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "site B's adapter or BN changed"
    changed = [n for n, p in model.named_parameters() if ".convs.0." in n and not torch.equal(p, site_a_before[n])]
    assert len(changed) == len(site_a_before), "site A's adapters should all have moved"


def test_parallel_adapter_keeps_shape_and_stride_of_the_shared_conv():
    shared = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
    adapted = AdaptedConv(shared, "parallel", num_sites=2)
    x, site = torch.randn(4, 8, 15, 15), torch.tensor([0, 1, 0, 1])
    assert adapted(x, site).shape == shared(x).shape == (4, 16, 8, 8)
    for conv in adapted.adapter.convs:
        assert conv.stride == (2, 2) and conv.kernel_size == (1, 1)
    # zero-initialised adapters start as the shared conv alone
    assert torch.allclose(adapted(x, site), shared(x))


def test_series_adapter_is_a_residual_on_the_shared_output_through_an_inner_site_bn():
    """Rebuffi et al. 2017: y + conv1x1_site(BN'_site(y)); BN'_site normalises with its own site's statistics."""
    shared = torch.nn.Conv2d(4, 6, 3, padding=1)
    adapted = AdaptedConv(shared, "series", num_sites=2)
    torch.nn.init.normal_(adapted.adapter.convs[1].weight)
    inner_b = adapted.inner_norm.norms[1]
    inner_b.running_mean.normal_()
    inner_b.running_var.uniform_(0.5, 2.0)
    torch.nn.init.normal_(inner_b.weight)
    adapted.eval()
    x, site = torch.randn(2, 4, 5, 5), torch.tensor([0, 1])
    y = shared(x)
    normalised = torch.nn.functional.batch_norm(
        y[1:], inner_b.running_mean, inner_b.running_var, inner_b.weight, inner_b.bias, eps=inner_b.eps
    )
    expected_b = y[1:] + torch.nn.functional.conv2d(normalised, adapted.adapter.convs[1].weight)
    out = adapted(x, site)
    assert torch.allclose(out[1:], expected_b, atol=1e-5) and torch.allclose(out[:1], y[:1])


def test_msnet_auxiliary_heads_see_only_their_own_site():
    model = tiny_method("msnet", kt_warmup_epochs=0)
    model.training_losses(_batch([0] * 6))["loss"].backward()
    assert all(p.grad is None for p in model.aux_heads[1].parameters())
    assert all(p.grad is not None for p in model.aux_heads[0].linears.parameters())


def test_msnet_transfer_term_passes_no_gradient_into_auxiliary_heads():
    model = tiny_method("msnet", kt_warmup_epochs=0)
    losses = model.training_losses(_batch([0, 0, 0, 1, 1, 1]))
    losses["transfer"].backward()
    assert all(p.grad is None for p in model.aux_heads.parameters())
    assert model.net.classifier.linears[0].weight.grad is not None


def test_msnet_loss_weights_the_transfer_term_by_its_buffer():
    batch = _batch([0, 0, 0, 1, 1, 1])
    torch.manual_seed(1)
    model = tiny_method("msnet")
    losses = model.training_losses(batch)  # before any epoch: warm-up, no transfer
    assert losses["loss"].item() == pytest.approx((losses["ce"] + losses["aux_A"] + losses["aux_B"]).item(), rel=1e-5)
    model.transfer_weight.fill_(0.5)
    losses = model.training_losses(batch)
    aux = losses["aux_A"] + losses["aux_B"]
    expected = 0.5 * losses["ce"] + 0.5 * losses["transfer"] + aux
    assert losses["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.slow
def test_msnet_transfer_switches_on_after_warmup_in_training(phantom_root: Path, tmp_path: Path):
    """Through the real loop: the weight the loss read in each epoch (a buffer a captured step reads too)."""
    RecordingMSNet.weights_seen.clear()
    overrides = [f"data.root={phantom_root}", *FAST, "trainer.max_epochs=3", "model.kt_warmup_epochs=2"]
    overrides += ["model._target_=tests.helpers.RecordingMSNet", "model.kt_weight=0.3"]
    train(compose_experiment("msnet", overrides), tmp_path)
    assert RecordingMSNet.weights_seen == {0: [0.0], 1: [0.0], 2: [pytest.approx(0.3)]}


def test_msnet_tests_with_the_universal_head():
    model = tiny_method("msnet").eval()
    batch = _batch([0, 1, 0, 1])
    with torch.no_grad():
        assert torch.equal(model.logits(batch["image"], batch["site"]), model.net(batch["image"], batch["site"]))
