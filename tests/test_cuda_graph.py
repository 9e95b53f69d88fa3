"""model.speed.cuda_graph: the whole step as one replayed CUDA graph computes the eager step.

On the CPU the same `GraphedTrainingStep` runs every step eagerly, which checks its Lightning wiring;
the CUDA tests (run by experiments/bench/gpu-check.sh on a lent GPU) check capture and replay.
"""

import copy
import json
from pathlib import Path

import pytest
import torch

from covidct.bench import CLIP, random_batch, train_step
from covidct.errors import ConfigError, TrainingDiverged
from covidct.methods import MSNet, Ours, Single
from covidct.methods.base import SiteMethod
from covidct.methods.divergence import DivergenceGuard
from covidct.methods.graphed import GraphedTrainingStep, make_capturable
from covidct.methods.ours import contrastive_loss
from covidct.models.routing import site_blocks

TINY = {"redesign": True, "width": 0.125, "image_size": 64}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in model.parameters()])


def _pair(device: str, method: type = Ours) -> tuple[Ours, Ours, torch.optim.Optimizer, torch.optim.Optimizer]:
    torch.manual_seed(0)
    speed = {"sync_free_routing": True, "fused_optimizer": True, "cudnn_benchmark": False}
    extra = {"kt_warmup_epochs": 0} if method is MSNet else {}  # its transfer term on from the start
    eager = method(backbone=TINY, speed=speed, **extra).to(device).train()
    graphed = copy.deepcopy(eager)
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-3, weight_decay=1e-7, fused=True) for m in (eager, graphed)]
    return eager, graphed, *optimizers


def test_explicit_cuda_graph_says_what_it_needs():
    with pytest.raises(ConfigError, match="a CUDA device"):
        Ours(backbone=TINY, speed={"cuda_graph": True}).uses("cuda_graph")
    assert not Ours(backbone=TINY, speed={"cuda_graph": "auto"}).uses("cuda_graph")  # auto: quietly off on CPU


def test_a_compiled_trunk_inside_the_captured_step_captures_no_graphs_of_its_own(monkeypatch):
    monkeypatch.setattr(SiteMethod, "_cuda_graph_possible", lambda self, explicit: True)
    modes = []
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None, **kwargs: modes.append(mode) or fn)
    for compile_mode, expected in [("reduce-overhead", "default"), ("max-autotune", "max-autotune-no-cudagraphs")]:
        modes.clear()
        Ours(backbone=TINY, speed={"compile": True, "compile_mode": compile_mode}).enable_fast_path()
        assert modes and set(modes) == {expected}  # the trunk and every head


@pytest.mark.slow
def test_the_graphed_step_off_cuda_is_the_eager_step():
    eager, graphed, eager_opt, graphed_opt = _pair("cpu")
    step = GraphedTrainingStep(graphed, graphed_opt, CLIP)
    guard = DivergenceGuard()
    for seed in range(3):
        batch = random_batch(4, 64, torch.device("cpu"), seed=seed)
        expected = train_step("fast", eager, eager_opt, batch, guard)
        losses, report = step(batch)
        assert losses["loss"].item() == expected.item()
        assert report[0].item() == 0 and report[1].item() == expected.item()
    assert step.captures == 0 and torch.equal(_params(eager), _params(graphed))


@pytest.mark.slow
def test_training_with_the_graphed_step_gives_the_same_run(phantom_root: Path, tmp_path: Path, monkeypatch):
    """Lightning's wiring (training_step returning None, its own optimizer_step and zero_grad, logging,
    the divergence report, the epoch schedule) with the graphed step running eagerly on the CPU."""
    from covidct.run import train
    from tests.helpers import FAST, compose_experiment

    overrides = [
        f"data.root={phantom_root}",
        *FAST,
        "trainer.max_epochs=2",
        "seed=3",
        "model.speed.fused_optimizer=true",
    ]
    train(compose_experiment("ours", overrides), tmp_path / "plain")
    monkeypatch.setattr(SiteMethod, "_cuda_graph_possible", lambda self, explicit: True)
    used = []
    monkeypatch.setattr(GraphedTrainingStep, "__call__", _recording(GraphedTrainingStep.__call__, used))
    train(compose_experiment("ours", [*overrides, "model.speed.cuda_graph=true"]), tmp_path / "graphed")
    assert len(used) == 2 * 2  # 2 epochs x limit_train_batches=2
    plain, graphed = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("plain", "graphed"))
    assert {k: graphed[k] for k in ("test", "run")} == {k: plain[k] for k in ("test", "run")}
    weights = [
        torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=False) for run in ("plain", "graphed")
    ]
    assert weights[0]["global_step"] == weights[1]["global_step"] == 4
    for name, value in weights[0]["state_dict"].items():
        assert torch.equal(value, weights[1]["state_dict"][name]), name


def test_msnet_recaptures_when_its_transfer_term_switches_on(monkeypatch):
    model = MSNet(backbone=TINY, kt_warmup_epochs=2)
    step = GraphedTrainingStep(model, torch.optim.Adam(model.parameters()), CLIP)
    batch = random_batch(4, 64, torch.device("cpu"))
    keys = []
    for epoch in (1, 2):
        monkeypatch.setattr(MSNet, "current_epoch", property(lambda self, epoch=epoch: epoch))
        keys.append(step.key(batch))
    assert keys[0] != keys[1] and keys[0][:2] == keys[1][:2]


def test_a_captured_optimizer_is_saved_as_a_plain_one():
    """The graph keeps the learning rate in a device tensor; checkpoints keep a float, resumable anywhere."""
    model = Ours(backbone=TINY)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    make_capturable(optimizer)
    group = optimizer.param_groups[0]
    assert isinstance(group["lr"], torch.Tensor) and group["capturable"]
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    lr = group["lr"]
    optimizer.step(), scheduler.step()
    assert group["lr"] is lr and lr.item() == pytest.approx(5e-4)  # updated in place, where the graph reads it
    checkpoint = {"optimizer_states": [optimizer.state_dict()]}
    model.on_save_checkpoint(checkpoint)
    saved = checkpoint["optimizer_states"][0]["param_groups"][0]
    assert saved["lr"] == pytest.approx(5e-4) and not isinstance(saved["lr"], torch.Tensor)
    assert not saved["capturable"] and group["capturable"]


def _recording(call, used: list):
    def wrapper(self, batch):
        used.append(batch["site_layout"])
        return call(self, batch)

    return wrapper


def _eager_step(model: Ours, optimizer: torch.optim.Optimizer, batch: dict) -> torch.Tensor:
    """The step by its definition: bf16 loss, skip flag for the fused update, backward, clip, update."""
    with torch.autocast("cuda", dtype=torch.bfloat16), site_blocks(batch["site_layout"]):
        losses = model.training_losses(batch)
    DivergenceGuard.flag(losses, optimizer)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    model.clip_gradients_(CLIP)
    optimizer.step()
    return losses["loss"].detach()


@pytest.fixture
def deterministic_cudnn():
    previous = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("method", [Ours, Single, MSNet])
def test_replayed_graph_trains_as_the_eager_step_does(deterministic_cudnn, method):
    """New data every step, a learning-rate change, a skipped non-finite step and an odd batch layout."""
    eager, graphed, eager_opt, graphed_opt = _pair("cuda", method)
    step = GraphedTrainingStep(graphed, graphed_opt, CLIP, warmup=2)
    guard = DivergenceGuard()
    device = torch.device("cuda")
    start = _params(eager)
    for i in range(8):
        batch = random_batch(3 if i == 6 else 4, 64, device, seed=i)  # step 6: another layout, run eagerly
        if i == 5:  # a non-finite loss: both skip the update
            batch["image"][0] = float("nan")
        if i == 4:  # as a scheduler does: a float, or in place where the graph holds a tensor
            eager_opt.param_groups[0]["lr"] = 5e-4
            graphed_opt.param_groups[0]["lr"].fill_(5e-4)
        expected = _eager_step(eager, eager_opt, batch)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            losses, report = step(batch)
        guard.track(report, list(losses), epoch=0, step=i)
        torch.testing.assert_close(losses["loss"], expected, rtol=1e-3, atol=1e-5, equal_nan=True)
        assert bool(report[0]) == (i == 5)
        # Adam may flip the sign of a near-zero gradient's update, so compare with how far training moved
        moved, apart = (_params(eager) - start).norm(), (_params(graphed) - _params(eager)).norm()
        assert apart <= 1e-2 * moved, (i, apart.item(), moved.item())
        assert step.captures == (0 if i < 2 else 1)  # captured at the third step with the same layout
    with pytest.raises(TrainingDiverged, match="step 5"):
        guard.poll(wait=True)


@pytest.mark.gpu
@cuda
def test_the_contrastive_loss_captures():
    z, labels = torch.randn(8, 4, device="cuda"), torch.tensor([0, 1] * 4, device="cuda")
    expected = contrastive_loss(z, labels, 0.05)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = contrastive_loss(z, labels, 0.05)
    graph.replay()
    torch.testing.assert_close(out, expected)
