"""The fast path computes what the reference path computes; the benchmark runs on CPU."""

import copy
import json
from pathlib import Path

import pytest
import torch

from covidct.bench import main, reference_losses
from covidct.errors import ConfigError
from covidct.models import SiteBatchNorm
from covidct.training.fit import train
from tests.helpers import FAST, compose_experiment, fast_path_switches, grads, tiny_method, two_site_batch


def fast_losses(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """One routed forward for both sites, as training computes it."""
    return model.training_losses(batch)["loss"]


@pytest.fixture
def model_and_batch():
    torch.manual_seed(0)
    return tiny_method("ours").train(), two_site_batch()


def test_one_routed_forward_equals_one_forward_per_site(model_and_batch):
    model, batch = model_and_batch
    reference = reference_losses(model, batch)["loss"]
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
    reference = reference_losses(model, batch)["loss"].item()
    model = model.to(memory_format=torch.channels_last)
    image = batch["image"].contiguous(memory_format=torch.channels_last)
    assert fast_losses(model, {**batch, "image": image}).item() == pytest.approx(reference, rel=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = fast_losses(model, {**batch, "image": image}).item()
    assert bf16 == pytest.approx(reference, rel=5e-2)


@pytest.mark.slow
def test_bench_runs_on_cpu_and_writes_json(phantom_root: Path, tmp_path: Path):
    out = tmp_path / "bench.json"
    args = ["--device", "cpu", "--image-size", "32", "--width", "0.125", "--steps", "2", "--warmup", "1"]
    assert (
        main(
            [
                *args,
                "--data-root",
                str(phantom_root),
                "--workers",
                "0",
                "--concurrent",
                "2",
                "--dicom",
                "3",
                "--json",
                str(out),
            ]
        )
        == 0
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
    dicom = result["dicom"]  # a 512 x 512 JPEG Lossless series read as predict reads it
    assert (
        dicom["slices"] == 3
        and dicom["decode_in_process_slices_per_s"] > 0
        and dicom["decode_workers_slices_per_s"] > 0
    )
    assert "| decode |" in out.with_suffix(".md").read_text()


def test_full_width_forward_cost_matches_the_paper():
    from covidct.bench import forward_gflop_per_image

    assert forward_gflop_per_image(224, 1.0) == pytest.approx(12.3, rel=0.05)


def test_compile_switch_compiles_the_trunk_that_methods_call():
    """Methods call `net.features` directly, so that is what callbacks.fast_path.compile must wrap."""
    model = tiny_method("ours")
    plain = model.net.features
    fast = fast_path_switches(compile=True)
    fast.resolve(torch.device("cpu"))
    fast.speed_up(model)
    assert model.net.features is not plain and hasattr(model.net.features, "_torchdynamo_orig_callable")


@pytest.mark.parametrize(
    "experiment",
    [
        "ours",
        pytest.param("single", marks=pytest.mark.slow),
        pytest.param("msnet", marks=pytest.mark.slow),
    ],
)
def test_the_compiled_step_traces_whole_once_and_computes_the_eager_loss(experiment, monkeypatch):
    """A graph break (a host sync, say) or a recompile per batch in a compiled module would also break the
    captured step that compiling runs inside on a GPU (callbacks.fast_path.cuda_graph). Traced here with the
    aot_eager backend: Dynamo and AOTAutograd as on a GPU, without Inductor's minutes of C++ codegen."""
    from torch._dynamo.utils import counters

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None, **kw: real_compile(fn, backend="aot_eager", **kw))
    torch._dynamo.reset()
    counters.clear()
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(tiny_method(experiment).train())
    eager, compiled = models
    if experiment == "msnet":  # its transfer term in the graph too, read from its buffer
        for model in models:
            model.transfer_weight.fill_(0.5)
    fast = fast_path_switches(compile=True)
    fast.resolve(torch.device("cpu"))
    fast.speed_up(compiled)
    for seed in range(3):
        batch = two_site_batch(seed=seed)
        want, got = eager.training_losses(batch)["loss"], compiled.training_losses(batch)["loss"]
        want.backward()
        got.backward()  # the backward graphs are compiled on first use too
        assert got.item() == pytest.approx(want.item(), rel=1e-5)
        if seed == 0:
            graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert graphs > 0 and not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled after the first step
    assert (grads(compiled) - grads(eager)).norm() <= 1e-4 * grads(eager).norm()


def test_bad_fast_path_switches_are_config_errors():
    with pytest.raises(ConfigError, match="compile_mode must be one of"):
        fast_path_switches(compile_mode="fastest")
    with pytest.raises(ConfigError, match="gpu_tuning must be true, false or auto"):
        fast_path_switches(gpu_tuning="yes").resolve(torch.device("cpu"))


def test_gpu_default_path_trains_bf16_with_fused_adam_and_clipping(phantom_root: Path, tmp_path: Path):
    """bf16-mixed + channels_last + fused Adam + clipping (the CUDA defaults), here on the CPU.

    Lightning's precision plugin refused to clip for fused optimizers; the method clips itself.
    """
    overrides = [f"data.root={phantom_root}", *FAST, "trainer.precision=bf16-mixed"]
    overrides += ["callbacks.fast_path.gpu_tuning=true"]
    results = train(compose_experiment("ours", overrides), tmp_path)
    assert set(results["last"]["images"]) == {"A", "B"}
    assert json.loads((tmp_path / "metrics.json").read_text())["test"] == results


def test_the_method_clips_gradients_to_the_configured_norm():
    model = tiny_method("ours")
    for p in model.parameters():
        p.grad = torch.full_like(p, 10.0)
    model.configure_gradient_clipping(None, 2.0, "norm")
    norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert norm == pytest.approx(2.0, rel=1e-2)  # from about 10 * sqrt(#parameters)


def _with_live_adapters(experiment: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = tiny_method(experiment).train()
    for name, p in model.named_parameters():
        if "adapter" in name:
            p.data.normal_(0, 0.05)  # adapters start at zero; make them matter
    return model


@pytest.mark.parametrize("experiment", ["ours", "series_adapter", "parallel_adapter", "single", "msnet"])
def test_block_routing_of_datamodule_batches_is_the_indexed_computation(experiment):
    """Slicing declared site blocks: the indexed loss, gradients and running statistics, no host sync."""
    model = _with_live_adapters(experiment)
    batch = two_site_batch()
    blocked = copy.deepcopy(model)
    indexed_loss = fast_losses(model, {k: v for k, v in batch.items() if k != "site_layout"})
    blocked_loss = fast_losses(blocked, batch)
    assert blocked_loss.item() == pytest.approx(indexed_loss.item(), rel=1e-6)
    indexed_loss.backward()
    blocked_loss.backward()
    assert (grads(blocked) - grads(model)).norm() <= 1e-5 * grads(model).norm()
    for a, b in zip(model.buffers(), blocked.buffers()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)


def test_blocks_that_do_not_describe_the_batch_are_refused():
    from covidct.models.routing import SiteBlocks

    bn = SiteBatchNorm(3, num_sites=2).eval()
    with pytest.raises(ValueError, match="do not describe a batch of 4"):
        bn(torch.zeros(4, 3, 2, 2), SiteBlocks((0, 1), (4, 4)))


def test_site_layout_of_batches():
    from covidct.data.sampler import site_layout_of

    assert site_layout_of(torch.tensor([0, 0, 0, 1, 1, 1])) == ((0, 1), (3, 3))
    assert site_layout_of(torch.tensor([1, 1])) == ((1,), (2,))
    assert site_layout_of(torch.tensor([0, 1, 0])) is None
    assert site_layout_of(torch.tensor([], dtype=torch.long)) is None
