"""The fast path computes what the reference path computes; the benchmark runs on CPU."""

import json
from pathlib import Path

import pytest
import torch

from covidct.bench import fast_losses, main, random_batch, reference_losses
from covidct.methods import Ours

TINY = {"redesign": True, "width": 0.125, "image_size": 64}


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
    assert result["concurrent"][0]["runs"] == 2 and len(result["concurrent"][0]["per_run_img_per_s"]) == 2
    assert out.with_suffix(".md").read_text().startswith("# covidct bench")


def test_full_width_forward_cost_matches_the_paper():
    from covidct.bench import forward_gflop_per_image

    assert forward_gflop_per_image(224, 1.0) == pytest.approx(12.3, rel=0.05)
