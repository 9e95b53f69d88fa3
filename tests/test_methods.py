import math

import pytest
import torch

from covidct.methods import contrastive_loss
from covidct.models import SiteBatchNorm
from tests.helpers import tiny_method


def _batch(n_per_site: int = 4) -> dict:
    torch.manual_seed(0)
    return {
        "image": torch.randn(2 * n_per_site, 3, 64, 64),
        "label": torch.tensor([0, 1] * n_per_site),
        "site": torch.tensor([0] * n_per_site + [1] * n_per_site),
    }


def test_contrastive_loss_matches_hand_computed_value():
    # unit vectors at known angles; cosines: s01=.6 s02=0 s03=-1 s12=.8 s13=-.6 s23=0
    z = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]]) * torch.tensor([[2.0], [1.0], [3.0], [0.5]])
    labels = torch.tensor([0, 0, 1, 1])
    # tau = 0.5, one term per ordered positive pair, negatives of the anchor in the denominator:
    # l01 = log(1 + (e^0 + e^-2) / e^1.2) = 0.294132, l10 = log(1 + (e^1.6 + e^-1.2) / e^1.2) = 0.948775,
    # l23 = log(1 + e^0 + e^1.6) = 1.939178,            l32 = log(1 + e^-2 + e^-1.2) = 0.362229
    expected = (0.294132 + 0.948775 + 1.939178 + 0.362229) / 4
    assert contrastive_loss(z, labels, tau=0.5).item() == pytest.approx(expected, abs=1e-5)


def test_contrastive_loss_edge_cases():
    z = torch.randn(4, 8)
    assert contrastive_loss(z, torch.tensor([0, 1, 2, 3]), 0.05).item() == 0.0  # no positive pair
    assert contrastive_loss(z, torch.tensor([1, 1, 1, 1]), 0.05).item() == pytest.approx(0.0, abs=1e-6)  # no negative
    assert math.isfinite(contrastive_loss(z * 1e4, torch.tensor([0, 0, 1, 1]), 0.01).item())


def test_projection_head_is_trained_by_the_contrastive_term_only():
    model = tiny_method("ours", tau=0.05, alpha=1.0)
    batch = _batch()
    model.training_losses(batch)["ce"].backward()
    assert all(p.grad is None for p in model.projection.parameters())
    model.zero_grad(set_to_none=True)
    model.training_losses(batch)["contrastive"].backward()
    assert all(p.grad is not None for p in model.projection.linears.parameters())
    assert model.net.stem.weight.grad is not None and model.net.stem.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.net.classifier.linears.parameters())


def test_total_loss_weights_the_contrastive_term_by_alpha():
    batch = _batch()
    torch.manual_seed(1)
    losses = tiny_method("ours", alpha=0.3).training_losses(batch)
    assert losses["loss"].item() == pytest.approx(losses["ce"].item() + 0.3 * losses["contrastive"].item(), rel=1e-5)


def test_joint_shares_norms_and_sepnorm_separates_them():
    def norms(model):
        return [m for m in model.modules() if isinstance(m, SiteBatchNorm)]

    assert norms(tiny_method("joint")) and all(n.num_sites == 1 for n in norms(tiny_method("joint")))
    assert all(n.num_sites == 2 for n in norms(tiny_method("sepnorm")))
    assert all(n.num_sites == 2 for n in norms(tiny_method("ours")))


def test_single_networks_are_independent():
    model = tiny_method("single")
    batch = _batch()
    only_a = {k: v[batch["site"] == 0] for k, v in batch.items()}
    model.training_losses(only_a)["loss"].backward()
    assert all(p.grad is None for p in model.nets["B"].parameters())
    assert model.nets["A"].stem.weight.grad is not None


def test_single_clips_gradients_per_network():
    model = tiny_method("single")
    for net, scale in ((model.nets["A"], 100.0), (model.nets["B"], 0.001)):
        for p in net.parameters():
            p.grad = torch.full_like(p, scale)
    small_before = torch.cat([p.grad.flatten() for p in model.nets["B"].parameters()]).norm()
    model.configure_gradient_clipping(None, gradient_clip_val=2.0, gradient_clip_algorithm="norm")
    norm_a = torch.cat([p.grad.flatten() for p in model.nets["A"].parameters()]).norm()
    norm_b = torch.cat([p.grad.flatten() for p in model.nets["B"].parameters()]).norm()
    assert norm_a == pytest.approx(2.0, rel=1e-2)
    assert norm_b == pytest.approx(small_before.item(), rel=1e-6)  # a joint clip would have shrunk it


def test_single_routes_each_site_to_its_own_network():
    model = tiny_method("single").eval()
    batch = _batch(2)
    together = model.logits(batch["image"], batch["site"])
    with torch.no_grad():
        b_alone = model.nets["B"](batch["image"][2:], batch["site"][2:])
    assert torch.allclose(together[2:], b_alone, atol=1e-5)
