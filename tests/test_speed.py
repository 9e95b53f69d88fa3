"""The fast path computes what the reference path computes; the benchmark runs on CPU."""

import copy
import json
from pathlib import Path

import pytest
import torch

from covidct.bench import main, random_batch, reference_losses
from covidct.methods import MSNet, Ours, ParallelAdapter, SeriesAdapter, Single
from covidct.models.routing import SiteRouted, site_blocks

TINY = {"redesign": True, "width": 0.125, "image_size": 64}


def fast_losses(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """One routed forward for both sites, as training computes it."""
    return model.training_losses(batch)["loss"]


@pytest.fixture
def model_and_batch():
    torch.manual_seed(0)
    return Ours(backbone=TINY).train(), random_batch(4, 64, torch.device("cpu"))


def test_one_routed_forward_equals_one_forward_per_site(model_and_batch):
    model, batch = model_and_batch
    reference = reference_losses(model, batch)
    fast = fast_losses(model, batch)
    assert fast.item() == pytest.approx(reference.item(), rel=1e-5)
    reference.backward()
    reference_grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad()
    fast.backward()
    fast_grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    # equal up to float summation order (biases before a BN have near-zero, noise-only gradients)
    assert (fast_grads - reference_grads).norm() <= 1e-4 * reference_grads.norm()


def test_channels_last_and_bf16_stay_within_tolerance(model_and_batch):
    model, batch = model_and_batch
    reference = reference_losses(model, batch).item()
    model = model.to(memory_format=torch.channels_last)
    image = batch["image"].contiguous(memory_format=torch.channels_last)
    assert fast_losses(model, {**batch, "image": image}).item() == pytest.approx(reference, rel=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = fast_losses(model, {**batch, "image": image}).item()
    assert bf16 == pytest.approx(reference, rel=5e-2)


def test_bench_runs_on_cpu_and_writes_json(phantom_root: Path, tmp_path: Path):
    out = tmp_path / "bench.json"
    args = ["--device", "cpu", "--image-size", "32", "--width", "0.125", "--steps", "2", "--warmup", "1"]
    assert (
        main([*args, "--data-root", str(phantom_root), "--workers", "0", "--concurrent", "2", "--json", str(out)]) == 0
    )
    result = json.loads(out.read_text())
    assert result["reference"]["img_per_s"] > 0 and result["fast"]["img_per_s"] > 0
    assert result["ratio_fast_over_reference"] == pytest.approx(
        result["fast"]["img_per_s"] / result["reference"]["img_per_s"]
    )
    assert result["forward_gflop_per_image"] > 0 and result["data"]["img_per_s"] > 0
    # a sanity check (the equivalence tests above are the strict ones): on the CPU both paths train in fp32
    # from the same initialisation on the same batch
    assert result["fast"]["final_loss"] == pytest.approx(result["reference"]["final_loss"], rel=1e-3)
    assert result["concurrent"][0]["runs"] == 2 and len(result["concurrent"][0]["per_run_img_per_s"]) == 2
    assert out.with_suffix(".md").read_text().startswith("# covidct bench")


def test_full_width_forward_cost_matches_the_paper():
    from covidct.bench import forward_gflop_per_image

    assert forward_gflop_per_image(224, 1.0) == pytest.approx(12.3, rel=0.05)


def _grads(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])


@pytest.mark.parametrize("shape", [(10, 3, 5, 5), (10, 6)])
def test_sync_free_dsbn_equals_indexed_dsbn(shape):
    """Same outputs, gradients and running statistics as one nn.BatchNorm per site, in train and eval."""
    from covidct.models import SiteBatchNorm
    from covidct.models.routing import use_sync_free_routing

    torch.manual_seed(0)
    indexed = SiteBatchNorm(shape[1], num_sites=2, dim=len(shape) - 2 or 1)
    for p in indexed.parameters():
        p.data.uniform_(0.5, 1.5)
    sync_free = copy.deepcopy(indexed)
    use_sync_free_routing(sync_free)
    site = torch.tensor([1, 0, 0, 1, 1, 0, 1, 1, 0, 1])
    for step in range(3):
        x = torch.randn(shape) * (step + 2) + step
        outputs = []
        for bn in (indexed, sync_free):
            xi = x.clone().requires_grad_()
            out = bn(xi, site)
            (out * torch.arange(out.numel()).view_as(out).sin()).sum().backward()
            outputs.append((out, xi.grad))
        assert torch.allclose(outputs[0][0], outputs[1][0], atol=1e-5)
        assert torch.allclose(outputs[0][1], outputs[1][1], atol=1e-5)
    assert torch.allclose(_grads(indexed), _grads(sync_free), atol=1e-4)
    for a, b in zip(indexed.buffers(), sync_free.buffers()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)
    x = torch.randn(shape)
    assert torch.allclose(indexed.eval()(x, site), sync_free.eval()(x, site), atol=1e-5)


def test_sync_free_dsbn_leaves_an_absent_sites_statistics_alone():
    from covidct.models import SiteBatchNorm
    from covidct.models.routing import use_sync_free_routing

    bn = SiteBatchNorm(3, num_sites=2)
    use_sync_free_routing(bn)
    bn(torch.randn(4, 3, 2, 2) + 5, torch.zeros(4, dtype=torch.long))
    assert torch.equal(bn.norms[1].running_mean, torch.zeros(3)) and bn.norms[1].num_batches_tracked == 0
    assert bn.norms[0].running_mean.min() > 0.3 and bn.norms[0].num_batches_tracked == 1


def _with_live_adapters(method: type) -> torch.nn.Module:
    torch.manual_seed(0)
    model = method(backbone=TINY).train()
    for name, p in model.named_parameters():
        if "adapter" in name:
            p.data.normal_(0, 0.05)  # adapters start at zero; make them matter
    return model


@pytest.mark.parametrize("method", [Ours, SeriesAdapter, ParallelAdapter])
def test_sync_free_routing_gives_the_indexed_loss_and_gradients(method):
    """A whole network: the sync-free step is the indexed step (mixed, unsorted site order)."""
    from covidct.models.routing import use_sync_free_routing

    model = _with_live_adapters(method)
    batch = random_batch(4, 64, torch.device("cpu"))
    order = torch.randperm(8)
    batch = {k: batch[k][order] for k in ("image", "label", "site")}
    sync_free = copy.deepcopy(model)
    use_sync_free_routing(sync_free)
    losses = [fast_losses(m, batch) for m in (model, sync_free)]
    assert losses[1].item() == pytest.approx(losses[0].item(), rel=1e-5)
    for loss in losses:
        loss.backward()
    reference, fast = _grads(model), _grads(sync_free)
    assert (fast - reference).norm() <= 1e-4 * reference.norm()
    with torch.no_grad():
        model.eval(), sync_free.eval()
        image, site = batch["image"], batch["site"]
        assert torch.allclose(model.net(image, site), sync_free.net(image, site), atol=1e-4)


def test_compile_switch_compiles_the_trunk_that_methods_call():
    """Methods call `net.features` directly, so that is what model.speed.compile must wrap."""
    model = Ours(backbone=TINY, speed={"compile": True, "compile_mode": "default"})
    plain = model.net.features
    model.enable_fast_path()
    assert model.net.features is not plain and hasattr(model.net.features, "_torchdynamo_orig_callable")
    # indexed routing would break the graph at every routed layer, so compiling implies sync-free routing
    assert all(m.sync_free for m in model.modules() if isinstance(m, SiteRouted))


@pytest.mark.parametrize("method", [Ours, Single, MSNet])
def test_the_compiled_step_traces_whole_once_and_computes_the_eager_loss(method, monkeypatch):
    """A graph break (a host sync, say) or a recompile per batch in a compiled module would also break the
    captured step that compiling runs inside on a GPU (model.speed.cuda_graph). Traced here with the
    aot_eager backend: Dynamo and AOTAutograd as on a GPU, without Inductor's minutes of C++ codegen."""
    from torch._dynamo.utils import counters

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None, **kw: real_compile(fn, backend="aot_eager", **kw))
    torch._dynamo.reset()
    counters.clear()
    extra = {"kt_warmup_epochs": 0} if method is MSNet else {}  # MS-Net's transfer term in the graph too
    models = []
    for compile_ in (False, True):
        torch.manual_seed(0)
        models.append(method(backbone=TINY, speed={"compile": compile_, "sync_free_routing": True}, **extra).train())
    eager, compiled = models
    compiled.enable_fast_path()
    for seed in range(3):
        batch = random_batch(4, 64, torch.device("cpu"), seed=seed)
        with site_blocks(batch["site_layout"]):
            want, got = eager.training_losses(batch)["loss"], compiled.training_losses(batch)["loss"]
        want.backward()
        got.backward()  # the backward graphs are compiled on first use too
        assert got.item() == pytest.approx(want.item(), rel=1e-5)
        if seed == 0:
            graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert graphs > 0 and not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled after the first step
    assert (_grads(compiled) - _grads(eager)).norm() <= 1e-4 * _grads(eager).norm()


def test_unknown_compile_mode_is_a_config_error():
    from covidct.errors import ConfigError

    with pytest.raises(ConfigError, match="compile_mode must be one of"):
        Ours(backbone=TINY, speed={"compile_mode": "fastest"})


def test_gpu_default_path_trains_bf16_with_fused_adam_and_clipping(phantom_root: Path, tmp_path: Path):
    """bf16-mixed + fused Adam + clipping + sync-free routing (the CUDA defaults), here on the CPU.

    Lightning's precision plugin refused to clip for fused optimizers; the method clips itself.
    """
    from covidct.run import train
    from tests.helpers import FAST, compose_experiment

    overrides = [f"data.root={phantom_root}", *FAST, "trainer.precision=bf16-mixed"]
    overrides += ["model.speed.fused_optimizer=true", "model.speed.sync_free_routing=true"]
    results = train(compose_experiment("ours", overrides), tmp_path)
    assert set(results["last"]["images"]) == {"A", "B"}
    assert json.loads((tmp_path / "metrics.json").read_text())["test"] == results


def test_the_method_clips_gradients_to_the_configured_norm():
    model = Ours(backbone=TINY)
    for p in model.parameters():
        p.grad = torch.full_like(p, 10.0)
    model.configure_gradient_clipping(None, 2.0, "norm")
    norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert norm == pytest.approx(2.0, rel=1e-2)  # from about 10 * sqrt(#parameters)


@pytest.mark.parametrize("method", [Ours, SeriesAdapter, ParallelAdapter, Single, MSNet])
def test_block_routing_of_datamodule_batches_is_the_indexed_computation(method):
    """Slicing declared site blocks: the indexed loss, gradients and running statistics, no host sync."""
    model = _with_live_adapters(method)
    batch = random_batch(4, 64, torch.device("cpu"))
    blocked = copy.deepcopy(model)
    indexed_loss = fast_losses(model, batch)
    with site_blocks(batch["site_layout"]):
        blocked_loss = fast_losses(blocked, batch)
    assert blocked_loss.item() == pytest.approx(indexed_loss.item(), rel=1e-6)
    indexed_loss.backward()
    blocked_loss.backward()
    assert (_grads(blocked) - _grads(model)).norm() <= 1e-5 * _grads(model).norm()
    for a, b in zip(model.buffers(), blocked.buffers()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)


def test_a_layout_is_used_only_for_the_batch_it_describes():
    from covidct.models import SiteBatchNorm

    bn = SiteBatchNorm(3, num_sites=2).eval()
    bn.norms[1].running_mean.fill_(5.0)
    x = torch.zeros(4, 3, 2, 2)
    with site_blocks(((0, 1), (4, 4))):  # describes a batch of 8: x (4 rows of site B) routes by its own sites
        out = bn(x, torch.ones(4, dtype=torch.long))
    assert torch.allclose(out, torch.full_like(out, -5.0), atol=1e-3)


def test_site_layout_of_batches():
    from covidct.data.sampler import site_layout_of

    assert site_layout_of(torch.tensor([0, 0, 0, 1, 1, 1])) == ((0, 1), (3, 3))
    assert site_layout_of(torch.tensor([1, 1])) == ((1,), (2,))
    assert site_layout_of(torch.tensor([0, 1, 0])) is None
    assert site_layout_of(torch.tensor([], dtype=torch.long)) is None
