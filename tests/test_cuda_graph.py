"""callbacks.fast_path.cuda_graph: the whole step as one replayed CUDA graph computes the eager step.

On the CPU the same `CapturedStep` runs every step eagerly, which checks its Lightning wiring (the
captured-optimization loop object); the CUDA tests (run by experiments/bench/gpu-check.sh on a lent GPU)
check capture and replay.
"""

import copy
import functools
import json
from pathlib import Path

import pytest
import torch

from covidct.errors import ConfigError, TrainingDiverged
from covidct.methods import Ours
from covidct.methods.ours import contrastive_loss
from covidct.training import CapturedStep, DivergenceGuard, clip_gradients
from covidct.training import fast_path as fast_path_module
from covidct.training.captured import make_capturable
from covidct.training.fit import train
from tests.helpers import FAST, compose_experiment, fast_path_switches, tiny_method, two_site_batch

CLIP = 2.0


def _params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in model.parameters()])


def _pair(device: str, experiment: str = "ours"):
    torch.manual_seed(0)
    eager = tiny_method(experiment).to(device).train()
    if experiment == "msnet":
        eager.transfer_weight.fill_(0.5)  # its transfer term on from the start
    graphed = copy.deepcopy(eager)
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-3, weight_decay=1e-7, fused=True) for m in (eager, graphed)]
    return eager, graphed, *optimizers


def _captured(model, optimizer, **kwargs) -> CapturedStep:
    clip = functools.partial(clip_gradients, model.clip_groups(), CLIP, "norm")
    return CapturedStep(model.training_losses, optimizer, clip, DivergenceGuard(), **kwargs)


def _eager_step(model, optimizer: torch.optim.Optimizer, batch: dict, autocast: bool = False) -> torch.Tensor:
    """The step by its definition: loss, skip flag for the fused update, backward, clip, update."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        losses = model.training_losses(batch)
    DivergenceGuard.flag(losses, optimizer)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    clip_gradients(model.clip_groups(), CLIP, "norm")
    optimizer.step()
    return losses["loss"].detach()


def test_explicit_cuda_graph_says_what_it_needs():
    with pytest.raises(ConfigError, match="a CUDA device"):
        fast_path_switches(cuda_graph=True).resolve(torch.device("cpu"))
    assert not fast_path_switches(cuda_graph="auto").resolve(torch.device("cpu"))[
        "cuda_graph"
    ]  # auto: quietly off on CPU


def test_a_compiled_trunk_inside_the_captured_step_captures_no_graphs_of_its_own(monkeypatch):
    modes = []
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None, **kwargs: modes.append(mode) or fn)
    for compile_mode, expected in [("reduce-overhead", "default"), ("max-autotune", "max-autotune-no-cudagraphs")]:
        modes.clear()
        fast = fast_path_switches(compile=True, compile_mode=compile_mode)
        fast.active = {"gpu_tuning": False, "cuda_graph": True, "compile": True}
        fast.speed_up(tiny_method("ours"))
        assert modes and set(modes) == {expected}  # the trunk and every head


def test_the_captured_step_off_cuda_is_the_eager_step():
    eager, graphed, eager_opt, graphed_opt = _pair("cpu")
    step = _captured(graphed, graphed_opt)
    for seed in range(3):
        batch = two_site_batch(seed=seed)
        expected = _eager_step(eager, eager_opt, batch)
        losses = step(batch)
        assert losses["loss"].item() == expected.item()
    assert step.captures == 0 and torch.equal(_params(eager), _params(graphed))
    step.guard.poll(wait=True)  # every step's flag reached the host, none set


def test_the_captured_step_depends_on_no_method_state():
    """Its key is the batch's layout and shapes alone: what a loss reads besides the batch lives in tensors."""
    batch = two_site_batch()
    assert CapturedStep.key(batch) == (batch["site_layout"], CapturedStep.key(two_site_batch(seed=1))[1])


@pytest.mark.slow
def test_training_with_the_captured_step_gives_the_same_run(phantom_root: Path, tmp_path: Path, monkeypatch):
    """Lightning's wiring (the loop object, its step counting, logging, the divergence report, the epoch
    schedule, checkpoints) with the captured step running eagerly on the CPU."""
    overrides = [f"data.root={phantom_root}", *FAST, "trainer.max_epochs=2", "seed=3"]
    overrides += ["callbacks.fast_path.gpu_tuning=true"]  # fused Adam, as a captured step implies
    train(compose_experiment("ours", overrides), tmp_path / "plain")
    monkeypatch.setattr(fast_path_module, "cuda_graph_needs", lambda device, trainer: {"a CUDA device": True})
    used = []
    real_call = CapturedStep.__call__
    monkeypatch.setattr(CapturedStep, "__call__", lambda self, batch, *a: used.append(1) or real_call(self, batch, *a))
    train(compose_experiment("ours", [*overrides, "callbacks.fast_path.cuda_graph=true"]), tmp_path / "graphed")
    assert len(used) == 2 * 2  # 2 epochs x limit_train_batches=2
    plain, graphed = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("plain", "graphed"))
    assert {k: graphed[k] for k in ("test", "run")} == {k: plain[k] for k in ("test", "run")}
    logged = [(tmp_path / run / "csv" / "version_0" / "metrics.csv").read_text() for run in ("plain", "graphed")]
    assert "train/loss_epoch" in logged[0] and logged[0] == logged[1]  # the same losses logged at the same steps
    weights = [
        torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=False) for run in ("plain", "graphed")
    ]
    assert weights[0]["global_step"] == weights[1]["global_step"] == 4
    for name, value in weights[0]["state_dict"].items():
        assert torch.equal(value, weights[1]["state_dict"][name]), name


@pytest.mark.slow
def test_the_captured_step_runs_under_the_trainers_autocast(phantom_root: Path, tmp_path: Path, monkeypatch):
    """trainer.precision=bf16-mixed reaches the loss on the captured path as on Lightning's own."""
    monkeypatch.setattr(fast_path_module, "cuda_graph_needs", lambda device, trainer: {"a CUDA device": True})
    seen = []
    real_losses = Ours.training_losses
    monkeypatch.setattr(
        Ours,
        "training_losses",
        lambda self, batch: seen.append(torch.is_autocast_enabled("cpu")) or real_losses(self, batch),
    )
    overrides = [
        f"data.root={phantom_root}",
        *FAST,
        "trainer.precision=bf16-mixed",
        "callbacks.fast_path.cuda_graph=true",
    ]
    train(compose_experiment("ours", overrides), tmp_path)
    assert seen == [True, True]  # limit_train_batches=2, both in bf16 autocast


def test_a_captured_optimizer_updates_its_learning_rate_in_place():
    """The graph reads the learning rate from a device tensor, so a scheduler must update that tensor."""
    model = tiny_method("ours")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    make_capturable(optimizer)
    group = optimizer.param_groups[0]
    assert isinstance(group["lr"], torch.Tensor) and group["capturable"]
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    lr = group["lr"]
    optimizer.step(), scheduler.step()
    assert group["lr"] is lr and lr.item() == pytest.approx(5e-4)


@pytest.mark.slow
def test_checkpoints_of_a_captured_optimizer_hold_a_plain_one(phantom_root: Path, tmp_path: Path, monkeypatch):
    """Through trainer.fit: the capturable state a captured step gives the optimizer (here on the CPU, where the
    step runs eagerly) is saved as a float learning rate, resumable anywhere."""
    monkeypatch.setattr(fast_path_module, "cuda_graph_needs", lambda device, trainer: {"a CUDA device": True})
    real_eager = CapturedStep._eager

    def eager_after_capture_setup(self, batch):
        make_capturable(self.optimizer)  # what _capture does before a CUDA capture
        return real_eager(self, batch)

    monkeypatch.setattr(CapturedStep, "_eager", eager_after_capture_setup)
    overrides = [f"data.root={phantom_root}", *FAST, "callbacks.fast_path.cuda_graph=true", "keep_optimizer_state=true"]
    train(compose_experiment("ours", overrides), tmp_path)
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    (saved,) = checkpoint["optimizer_states"][0]["param_groups"]
    assert isinstance(saved["lr"], float) and not saved["capturable"]


@pytest.fixture
def deterministic_cudnn():
    previous = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous


@pytest.mark.gpu
@pytest.mark.parametrize("experiment", ["ours", "single", "msnet"])
def test_replayed_graph_trains_as_the_eager_step_does(deterministic_cudnn, experiment):
    """New data every step, a learning-rate change, a skipped non-finite step, an odd batch layout, and
    (MS-Net) a change of the transfer weight the captured loss reads from its buffer."""
    eager, graphed, eager_opt, graphed_opt = _pair("cuda", experiment)
    step = _captured(graphed, graphed_opt, warmup=2)
    start = _params(eager)
    for i in range(8):
        batch = two_site_batch(3 if i == 6 else 4, device="cuda", seed=i)  # step 6: another layout, run eagerly
        if i == 5:  # a non-finite loss: both skip the update
            batch["image"][0] = float("nan")
        if i == 4:  # as a scheduler does: a float, or in place where the graph holds a tensor
            eager_opt.param_groups[0]["lr"] = 5e-4
            graphed_opt.param_groups[0]["lr"].fill_(5e-4)
        if i == 3 and experiment == "msnet":  # as on_train_epoch_start does, after the capture
            eager.transfer_weight.fill_(0.25)
            graphed.transfer_weight.fill_(0.25)
        expected = _eager_step(eager, eager_opt, batch, autocast=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            losses = step(batch, 0, i)
        torch.testing.assert_close(losses["loss"], expected, rtol=1e-3, atol=1e-5, equal_nan=True)
        # Adam may flip the sign of a near-zero gradient's update, so compare with how far training moved
        moved, apart = (_params(eager) - start).norm(), (_params(graphed) - _params(eager)).norm()
        assert apart <= 1e-2 * moved, (i, apart.item(), moved.item())
        assert step.captures == (0 if i < 2 else 1)  # captured at the third step with the same layout
    with pytest.raises(TrainingDiverged, match="step 5"):
        step.guard.poll(wait=True)


@pytest.mark.gpu
def test_the_contrastive_loss_captures():
    z, labels = torch.randn(8, 4, device="cuda"), torch.tensor([0, 1] * 4, device="cuda")
    expected = contrastive_loss(z, labels, 0.05)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = contrastive_loss(z, labels, 0.05)
    graph.replay()
    torch.testing.assert_close(out, expected)
