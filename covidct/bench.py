"""`python -m covidct.bench` (`make bench`): training throughput of a reference-like and the fast path,
and of the data pipeline, measured in one process on one device.

(a) reference: fp32, NCHW, eager, one forward per site per step, plain Adam (the authors' settings);
(b) fast: training's fast path (covidct/training, `callbacks.fast_path`): one block-routed forward for both
    sites, and on GPU bf16 autocast, channels_last, cuDNN autotuning, fused Adam whose divergence guard never
    waits for the device; variants (`--variants`) add torch.compile and/or the whole step as one CUDA graph.
Both run the full optimizer step of `ours` as its experiment config builds it (CE + contrastive, Adam,
the configured gradient clipping) on random images, through the step function training's captured path
uses (`CapturedStep`), so the bench measures the code that trains.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.flop_counter import FlopCounterMode

import covidct.resolvers  # noqa: F401  (the config's interpolations)
from covidct.atomic import atomic_write_text
from covidct.cli import cli_errors
from covidct.config_checks import MIN_BATCH_PER_SITE, MIN_IMAGE_SIZE
from covidct.errors import ConfigError
from covidct.methods import Ours
from covidct.methods.ours import contrastive_loss
from covidct.records import git_commit
from covidct.training import CapturedStep, DivergenceGuard, FastPath, clip_gradients

CONF = Path(__file__).resolve().parents[1] / "conf"
GPU_VARIANTS = "eager,graph,compile:default+graph"


def ours_config(image_size: int, width: float) -> DictConfig:
    """`experiment=ours` as conf/ composes it, at this size and width."""
    overrides = ["experiment=ours", f"data.image_size={image_size}", f"model.backbone.width={width}"]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides)


def reference_losses(model: Ours, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The authors' step: one forward per site, embeddings joined for the contrastive term."""
    embeddings, logits = [], []
    for s in batch["site"].unique(sorted=True):
        mask = batch["site"] == s
        embedding = model.net.features(batch["image"][mask], batch["site"][mask])
        embeddings.append(model.projection(embedding, batch["site"][mask]))
        logits.append(model.net.classify(embedding, batch["site"][mask]))
    labels = torch.cat([batch["label"][batch["site"] == s] for s in batch["site"].unique(sorted=True)])
    ce = F.cross_entropy(torch.cat(logits), labels)
    return {"loss": ce + model.hparams.alpha * contrastive_loss(torch.cat(embeddings), labels, model.hparams.tau)}


def random_batch(
    batch_per_site: int, image_size: int, device: torch.device, seed: int = 0, n_sites: int = 2
) -> dict[str, Any]:
    """A training batch as the DataModule delivers it: one block of `batch_per_site` images per site, in the
    sites' order, declared (`n_sites`: the benchmarked config's, the paper's two)."""
    generator = torch.Generator().manual_seed(seed)
    n = n_sites * batch_per_site
    return {
        "image": torch.randn(n, 3, image_size, image_size, generator=generator).to(device),
        "label": torch.randint(0, 2, (n,), generator=generator).to(device),
        "site": torch.arange(n_sites).repeat_interleave(batch_per_site).to(device),
        "site_layout": (tuple(range(n_sites)), (batch_per_site,) * n_sites),
    }


Variant = tuple[str | None, bool]  # (torch.compile mode or None, whole step as one CUDA graph)


def parse_variant(text: str) -> Variant:
    """eager | graph | compile:MODE | compile:MODE+graph"""
    graph = text.endswith("+graph") or text == "graph"
    base = text.removesuffix("+graph")
    if base in ("eager", "graph"):
        return None, graph
    if base.startswith("compile:"):
        return base.split(":", 1)[1], graph
    raise ConfigError(f"unknown bench variant {text!r}; use eager, graph, compile:MODE or compile:MODE+graph.")


def variant_text(variant: Variant) -> str:
    mode, graph = variant
    base = "eager" if mode is None else f"compile:{mode}"
    return "graph" if base == "eager" and graph else base + ("+graph" if graph else "")


def path_name(variant: Variant) -> str:
    mode, graph = variant
    return "fast" + ("" if mode is None else f"+compile({mode})") + ("+graph" if graph else "")


def build_step(
    path: str, device: torch.device, image_size: int, width: float, variant: Variant = (None, False)
) -> CapturedStep:
    """The reference step, or the fast one with the switches training applies (`FastPath`, its other
    settings as training's config has them)."""
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = False
    cfg = ours_config(image_size, width)
    model = instantiate(cfg.model, _convert_="all").to(device).train()
    fused, capture = False, False
    if path == "reference":
        losses: Callable[[dict[str, Any]], dict[str, torch.Tensor]] = functools.partial(reference_losses, model)
    else:
        compile_mode, graph = variant
        switches: dict[str, Any] = {"cuda_graph": graph, "compile": compile_mode is not None}
        if compile_mode is not None:
            switches["compile_mode"] = compile_mode
        fast: FastPath = instantiate(cfg.callbacks.fast_path, **switches)
        fast.resolve(device)
        fast.speed_up(model)
        fused, capture, losses = fast.fused_optimizer(), fast.active["cuda_graph"], model.training_losses
    optimizer = model.build_optimizer(model.parameters(), **({"fused": True} if fused else {}))
    clip_value, clip_algorithm = cfg.trainer.gradient_clip_val, cfg.trainer.gradient_clip_algorithm
    clip = functools.partial(clip_gradients, model.clip_groups(), clip_value, clip_algorithm)
    return CapturedStep(losses, optimizer, clip, DivergenceGuard(), capture=capture)


def print_profile(name: str, step: Callable[[], None], device: torch.device, steps: int = 5) -> None:
    """Where a step's time goes (host and device), to stderr: the table that says what to speed up next."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(steps):
            step()
        _sync(device)
    for sort in ("self_cpu_time_total", "self_device_time_total" if device.type == "cuda" else "cpu_time_total"):
        table = profiler.key_averages().table(sort_by=sort, row_limit=20, max_name_column_width=60)
        print(f"\n== profile of {steps} steps, {name}, by {sort}\n{table}", file=sys.stderr)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_training(
    path: str,
    device: torch.device,
    image_size: int,
    batch_per_site: int,
    width: float,
    steps: int,
    warmup: int,
    variant: Variant = (None, False),
    profile: bool = False,
) -> dict[str, Any]:
    name = "reference" if path == "reference" else path_name(variant)
    try:
        train_step = build_step(path, device, image_size, width, variant)
        batch = random_batch(batch_per_site, image_size, device)
        bf16 = path != "reference" and device.type == "cuda"

        def step() -> torch.Tensor:
            with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
                losses = train_step(batch)
            train_step.guard.poll()
            return losses["loss"]

        start = time.perf_counter()
        for _ in range(warmup):
            step()
        _sync(device)
        warmup_seconds = time.perf_counter() - start
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for _ in range(steps):
            loss = step()
        _sync(device)
        seconds = time.perf_counter() - start
        train_step.guard.poll(wait=True)
        final_loss = loss.item()  # before profiling's steps (a graph's output is overwritten in place)
        if profile:
            print_profile(name, step, device)
    except Exception as error:  # a variant that fails (e.g. compile on this stack) is reported, not fatal
        return {"path": name, "error": f"{type(error).__name__}: {error}"[:2000]}
    finally:
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    images = steps * 2 * batch_per_site
    return {
        "path": name,
        "img_per_s": images / seconds,
        "seconds": seconds,
        "warmup_seconds": warmup_seconds,
        "steps": steps,
        # every path trains from the same initialisation on the same batch: a fast path that computed
        # something else would end at another loss (bf16 moves it a little)
        "final_loss": final_loss,
        **({"graph_captures": train_step.captures} if train_step.capture else {}),
        "peak_memory_mb": (
            torch.cuda.max_memory_allocated(device) / 2**20
            if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        ),
    }


def forward_gflop_per_image(image_size: int, width: float) -> float:
    model = instantiate(ours_config(image_size, width).model, _convert_="all").eval()
    batch = random_batch(1, image_size, torch.device("cpu"))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.net(batch["image"], batch["site"])
    return counter.get_total_flops() / 2 / 1e9


def measure_data(root: Path, image_size: int, batch_per_site: int, workers: int, batches: int) -> dict[str, Any]:
    """Images per second the DataModule delivers (cache warm, augmentation on), after one warm-up batch."""
    from covidct.data import SiteDataModule

    datamodule = SiteDataModule(
        root,
        image_size=image_size,
        batch_per_site=batch_per_site,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
    )
    start = time.perf_counter()
    datamodule.setup()  # scans the data and fills the decode-once cache where it is cold
    setup_seconds = time.perf_counter() - start
    iterator = iter(datamodule.train_dataloader())
    next(iterator)
    start, start_cpu = time.perf_counter(), time.process_time()
    n = batches_read = 0
    for _ in range(batches):
        try:
            n += len(next(iterator)["label"])
            batches_read += 1
        except StopIteration:
            break
    return {
        "img_per_s": n / (time.perf_counter() - start),
        # what receiving (and pinning) a batch costs the training process: its ceiling whatever the workers
        "main_process_cpu_ms_per_batch": 1e3 * (time.process_time() - start_cpu) / max(batches_read, 1),
        "batches": batches,
        "workers": workers,
        "setup_seconds": setup_seconds,
    }


def synthetic_ct_series(folder: Path, slices: int, size: int = 512) -> list[Path]:
    """A CT series as PACS export it: `size` x `size` 16-bit slices in JPEG Lossless (process 14, SV1), written by
    GDCM (pydicom cannot encode it), files without a suffix; body-like content (pydicom's CT slice, enlarged) with
    scanner-like noise, so the codec works as hard as on a real series."""
    import gdcm
    import numpy as np
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    body = np.kron(template.pixel_array.astype(np.float32), np.ones((size // 128, size // 128), np.float32))
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    series, paths = generate_uid(), []
    for k in range(slices):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.Rows = ds.Columns = size
        ds.PixelData = np.clip(body + rng.normal(0, 20, body.shape), -2000, 4000).astype(np.int16).tobytes()
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series, generate_uid()
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, 2.5 * k], [1, 0, 0, 0, 1, 0]
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        raw = folder / f".raw{k}.dcm"
        ds.save_as(raw, enforce_file_format=True)
        reader = gdcm.ImageReader()
        reader.SetFileName(str(raw))
        if not reader.Read():
            raise RuntimeError(f"GDCM could not read {raw}")
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
        change.SetInput(reader.GetImage())
        if not change.Change():
            raise RuntimeError(f"GDCM could not transcode {raw}")
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(folder / f"IM{k:04d}"))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        if not writer.Write():
            raise RuntimeError(f"GDCM could not write {folder / f'IM{k:04d}'}")
        raw.unlink()
        paths.append(folder / f"IM{k:04d}")
    return paths


def _resized_slice(resize: Callable[[Any], Any], path: Path, ct_window: Sequence[float]) -> Any:
    from covidct.data.sources import load_image

    return resize(load_image(path, ct_window))


def measure_dicom(slices: int, image_size: int, workers: int, ckpt: Path | None) -> dict[str, Any]:
    """Slices per second predict reads of a 512 x 512 JPEG Lossless series: decoded, windowed and resized in this
    process and by `workers` processes (covidct/data/decoding.py, as predict reads); with a checkpoint, also
    classified by it in batches of 32, as predict does."""
    import tempfile

    from covidct.data.decoding import DecodedImages, chunks
    from covidct.data.dicom import LUNG_WINDOW

    model = None
    if ckpt is not None:
        from covidct.inference.trained import TrainedModel

        model = TrainedModel(ckpt, "cpu")
    with tempfile.TemporaryDirectory(prefix="covidct-bench-dicom-") as temp:
        folder = Path(temp) / "series"
        files = synthetic_ct_series(folder, slices)
        result: dict[str, Any] = {"slices": slices, "size": "512x512", "syntax": "JPEG Lossless SV1"}
        result["workers"] = workers
        from covidct.data.transforms import deterministic_resize

        load = functools.partial(_resized_slice, deterministic_resize("eval", image_size))  # built once, not per slice
        for name, n in (("decode_in_process", 0), ("decode_workers", workers)):
            start = time.perf_counter()
            decoded = list(DecodedImages(load, folder, files, LUNG_WINDOW, n))
            result[f"{name}_slices_per_s"] = len(decoded) / (time.perf_counter() - start)
        if model is not None:
            site = model.sites[0]
            for name, n in (("predict_in_process", 0), ("predict_workers", workers)):
                start = time.perf_counter()
                for chunk in chunks(DecodedImages(model.load, folder, files, LUNG_WINDOW, n), 32):
                    images = [image for _, image, _ in chunk if image is not None]
                    if images:
                        model.prob_covid(model.batch(images), site)
                result[f"{name}_slices_per_s"] = len(files) / (time.perf_counter() - start)
    return result


def measure_concurrent(n: int, variant: Variant, args: argparse.Namespace) -> dict[str, Any]:
    """n independent fast-path processes on the same device at once: aggregate images per second."""
    command = [
        sys.executable, "-m", "covidct.bench", "--only-fast", "--device", args.device,
        "--image-size", str(args.image_size), "--batch-per-site", str(args.batch_per_site),
        "--width", str(args.width), "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--variants", variant_text(variant), "--json", "-",
    ]  # fmt: skip
    start = time.perf_counter()
    env = dict(os.environ)
    if args.device == "cpu":  # share the cores instead of oversubscribing them n times
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env) for _ in range(n)]
    outputs = [json.loads(p.communicate()[0].splitlines()[-1]) for p in processes]
    wall = time.perf_counter() - start
    errors = [o["fast"]["error"] for o in outputs if "error" in o["fast"]]
    if errors:
        return {"runs": n, "path": path_name(variant), "error": errors[0]}
    per_run = [o["fast"]["img_per_s"] for o in outputs]
    return {
        "runs": n,
        "path": path_name(variant),
        "sum_img_per_s": sum(per_run),
        "per_run_img_per_s": per_run,
        "wall_s": wall,
    }


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or 'x86'})"


def markdown(result: dict[str, Any]) -> str:
    reference = result["paths"][0].get("img_per_s")
    lines = [
        f"# covidct bench: {result['device']}",
        "",
        f"commit {result['git_commit']}, torch {result['torch']}, {result['settings']}",
        "",
        "| what | img/s | x reference | TFLOP/s | peak memory (MB) | warm-up (s) | final loss |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["paths"]:
        if "error" in r:
            lines.append(f"| {r['path']} | failed: {r['error'].splitlines()[0][:100]} | | | | | |")
            continue
        ratio = f"{r['img_per_s'] / reference:.2f}" if reference else ""
        lines.append(
            f"| {r['path']} | {r['img_per_s']:.1f} | {ratio} | {r['tflops']:.3g} | {r['peak_memory_mb']:.0f} "
            f"| {r['warmup_seconds']:.1f} | {r['final_loss']:.4f} |"
        )
    for c in result.get("concurrent", []):
        if "error" in c:
            lines.append(
                f"| {c['runs']} concurrent {c['path']} runs | failed: {c['error'].splitlines()[0][:100]} ||||||"
            )
            continue
        ratio = f"{c['sum_img_per_s'] / reference:.2f}" if reference else ""
        lines.append(f"| {c['runs']} concurrent {c['path']} runs (sum) | {c['sum_img_per_s']:.1f} | {ratio} | | | | |")
    if "data" in result:
        d = result["data"]
        lines.append(
            f"| data pipeline ({d['workers']} workers; {d['ratio_over_fast_demand']:.2f}x the fastest path's demand; "
            f"{d['main_process_cpu_ms_per_batch']:.1f} ms of the main process's CPU per batch) "
            f"| {d['img_per_s']:.1f} | | | | {d['setup_seconds']:.1f} | |"
        )
    if "dicom" in result:
        d = result["dicom"]
        lines += ["", f"DICOM: {d['slices']} slices of {d['size']} {d['syntax']}, slices/s:", ""]
        lines += ["| what | in process | " + f"{d['workers']} workers | x in process |", "|---|---:|---:|---:|"]
        for what in ("decode", "predict"):
            if f"{what}_in_process_slices_per_s" in d:
                one, many = d[f"{what}_in_process_slices_per_s"], d[f"{what}_workers_slices_per_s"]
                lines.append(f"| {what} | {one:.1f} | {many:.1f} | {many / one:.2f} |")
    return "\n".join(lines) + "\n"


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `low`, as the run options hold data.image_size and data.batch_per_site."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    return parse


@cli_errors
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m covidct.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    size = _at_least(MIN_IMAGE_SIZE)
    parser.add_argument("--image-size", type=size, default=None, help="default: 224 on GPU, 64 on CPU")
    parser.add_argument("--batch-per-site", type=_at_least(MIN_BATCH_PER_SITE), default=16)
    parser.add_argument("--width", type=float, default=None, help="default: 1.0 on GPU, 0.25 on CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 50 on GPU, 5 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 10 GPU, 2 CPU)")
    parser.add_argument(
        "--variants",
        default=None,
        help="fast-path variants, comma-separated: eager, graph (the step as one CUDA graph), compile:MODE "
        "(a torch.compile mode), compile:MODE+graph (default: " + GPU_VARIANTS + " on GPU, eager on CPU)",
    )
    parser.add_argument("--data-root", type=Path, default=None, help="measure the data pipeline on this data")
    parser.add_argument("--workers", type=int, default=None, help="data loader workers (default: CPU count)")
    parser.add_argument(
        "--dicom", type=int, default=0, help="also time reading a 512x512 JPEG Lossless series of N slices"
    )
    parser.add_argument("--ckpt", type=Path, default=None, help="with --dicom: also time predict with this checkpoint")
    parser.add_argument("--concurrent", default="", help="e.g. 1,4: aggregate img/s of N runs sharing the device")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table per path (stderr)")
    parser.add_argument("--only-fast", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", default="outputs/bench/bench.json", help="where the JSON goes ('-': stdout)")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.image_size = args.image_size or (224 if gpu else 64)
    args.width = args.width or (1.0 if gpu else 0.25)
    args.steps = args.steps or (50 if gpu else 5)
    args.warmup = args.warmup if args.warmup is not None else (10 if gpu else 2)
    common = (device, args.image_size, args.batch_per_site, args.width, args.steps, args.warmup)
    variants = [parse_variant(v) for v in (args.variants or (GPU_VARIANTS if gpu else "eager")).split(",")]
    if args.only_fast:
        print(json.dumps({"fast": measure_training("fast", *common, variant=variants[0])}))
        return 0
    result: dict[str, Any] = {
        "device": device_name(device),
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "settings": f"{args.image_size} px, batch {args.batch_per_site}+{args.batch_per_site}, width {args.width}, "
        f"{args.steps} timed steps after {args.warmup}",
        "paths": [measure_training("reference", *common, profile=args.profile)]
        + [measure_training("fast", *common, variant=v, profile=args.profile) for v in variants],
    }

    def save() -> None:  # after each part, so a part that runs out of time keeps the others' results
        if args.json != "-":
            atomic_write_text(Path(args.json), json.dumps(result, indent=2) + "\n")

    gflop = forward_gflop_per_image(args.image_size, args.width)
    result["forward_gflop_per_image"] = gflop
    measured = [r for r in result["paths"] if "error" not in r]
    for r in measured:
        r["tflops"] = r["img_per_s"] * 3 * gflop / 1e3  # forward + backward ~ 3x forward
    result["reference"] = result["paths"][0]
    fast_paths = [r for r in measured if r["path"] != "reference"]
    if "error" not in result["reference"] and fast_paths:
        result["fast"] = max(fast_paths, key=lambda r: r["img_per_s"])
        result["ratio_fast_over_reference"] = result["fast"]["img_per_s"] / result["reference"]["img_per_s"]
    best = variants[[path_name(v) for v in variants].index(result["fast"]["path"])] if "fast" in result else variants[0]
    save()
    if args.data_root:
        workers = args.workers if args.workers is not None else min(16, os.cpu_count() or 1)
        result["data"] = measure_data(args.data_root, args.image_size, args.batch_per_site, workers, batches=120)
        demand = result["fast"]["img_per_s"] if "fast" in result else float("nan")
        result["data"]["ratio_over_fast_demand"] = result["data"]["img_per_s"] / demand
        save()
    if args.dicom:
        workers = args.workers if args.workers is not None else min(4, os.cpu_count() or 1)
        result["dicom"] = measure_dicom(args.dicom, args.image_size, workers, args.ckpt)
        save()
    if args.concurrent:
        result["concurrent"] = []
        for n in args.concurrent.split(","):
            result["concurrent"].append(measure_concurrent(int(n), best, args))
            save()
    text = markdown(result)
    print(text)
    if args.json == "-":
        print(json.dumps(result, indent=2))
    else:
        path = Path(args.json)
        atomic_write_text(path, json.dumps(result, indent=2) + "\n")
        atomic_write_text(path.with_suffix(".md"), text)
        print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
