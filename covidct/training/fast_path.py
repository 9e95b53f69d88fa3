"""The fast path of training, attached to any method as a Lightning callback.

Switches (`callbacks.fast_path.*`): true, false, or "auto" (on where it helps: with CUDA). Kept are those
whose effect was measured, alone or together (experiments/bench/README.md):
- gpu_tuning: channels_last weights and inputs, cuDNN autotuning and a fused Adam, together;
- cuda_graph: the whole training step captured once and replayed (training/captured.py);
- compile (off by default): torch.compile of the conv trunk and the dense heads, in compile_mode.
Precision is the Trainer's (trainer.precision=auto: bf16-mixed on a GPU with bf16).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loops.optimization.automatic import _AutomaticOptimization
from pytorch_lightning.loops.progress import _OptimizationProgress

from covidct.errors import ConfigError
from covidct.models import CovidNet, SiteMLP
from covidct.training.captured import CapturedStep
from covidct.training.clipping import clip_gradients
from covidct.training.divergence import DivergenceGuard

Switch = bool | str
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# inside a captured step a compiled graph must not capture graphs of its own
WITHOUT_CUDA_GRAPHS = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


def _on(value: Switch, cuda: bool, name: str) -> bool:
    if value == "auto":
        return cuda
    if isinstance(value, bool):
        return value
    raise ConfigError(f"callbacks.fast_path.{name} must be true, false or auto, got {value!r}.")


def cuda_graph_needs(device: torch.device, trainer: pl.Trainer | None) -> dict[str, bool]:
    """What a captured step needs, and whether this run has it."""
    return {
        "a CUDA device": device.type == "cuda",
        "one process (not DDP)": trainer is None or trainer.world_size == 1,
        "no gradient accumulation": trainer is None or trainer.accumulate_grad_batches == 1,
        "no float16 gradient scaler (use bf16-mixed or 32-true)": trainer is None
        or str(trainer.precision) != "16-mixed",
    }


def speed_up_module(module: torch.nn.Module, channels_last: bool, compile_mode: str | None) -> None:
    """channels_last weights and inputs, and torch.compile of every backbone's trunk and every dense head."""
    if channels_last:
        module.to(memory_format=torch.channels_last)
        for part in module.modules():
            if isinstance(part, CovidNet):
                part.channels_last_input = True
    if compile_mode is not None:
        for part in module.modules():
            if isinstance(part, CovidNet):
                # methods call `features` directly, so that (the whole conv trunk) is what gets compiled
                part.features = torch.compile(part.features, mode=compile_mode)
            elif isinstance(part, SiteMLP):  # classifier, projection and auxiliary heads
                part.compile(mode=compile_mode)


class CapturedOptimization(_AutomaticOptimization):
    """Lightning's automatic optimization with the whole step run by a `CapturedStep`: Lightning keeps
    counting steps, stepping schedulers and checkpointing; the step owns its gradients and update, so the
    hooks around them (on_before_zero_grad, on_before_backward, on_after_backward, on_before_optimizer_step,
    optimizer_step) are not called."""

    def __init__(self, trainer: pl.Trainer, step: CapturedStep, progress: _OptimizationProgress):
        super().__init__(trainer)
        self.step = step
        self.optim_progress = progress  # the replaced loop's: checkpoints and resumes count the same steps
        self.last_losses: dict[str, torch.Tensor] | None = None

    def run(self, optimizer: torch.optim.Optimizer, batch_idx: int, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        progress = self.optim_progress.optimizer.step
        progress.increment_ready()
        with self.trainer.precision_plugin.train_step_context():  # the autocast Lightning's training_step gets
            self.last_losses = self.step(kwargs["batch"], self.trainer.current_epoch, self.trainer.global_step)
        progress.increment_completed()
        return {}


class FastPath(pl.Callback):
    def __init__(self, *, gpu_tuning: Switch, cuda_graph: Switch, compile: Switch, compile_mode: str):
        if compile_mode not in COMPILE_MODES:
            raise ConfigError(f"callbacks.fast_path.compile_mode must be one of {COMPILE_MODES}, got {compile_mode!r}.")
        self.switches = {"gpu_tuning": gpu_tuning, "cuda_graph": cuda_graph, "compile": compile}
        self.compile_mode = compile_mode
        self.active: dict[str, bool] = {}
        self.captured_step: CapturedStep | None = None
        self._replaced: _AutomaticOptimization | None = None
        self._own_guard: DivergenceGuard | None = None  # polled here when no divergence_guard callback is

    def resolve(self, device: torch.device, trainer: pl.Trainer | None = None) -> dict[str, bool]:
        """Which switches are on for this device and run; `auto` quietly goes without a captured step where
        it cannot run, an explicit `true` says why not."""
        cuda = device.type == "cuda"
        active = {name: _on(value, cuda, name) for name, value in self.switches.items()}
        self.active = active
        if active["cuda_graph"]:
            missing = [need for need, met in cuda_graph_needs(device, trainer).items() if not met]
            if missing and self.switches["cuda_graph"] is True:
                raise ConfigError(
                    f"callbacks.fast_path.cuda_graph=true needs {'; '.join(missing)}. Set it to auto or false."
                )
            active["cuda_graph"] = not missing
        return active

    def fused_optimizer(self, trainer: pl.Trainer | None = None) -> bool:
        """A captured step skips a non-finite update inside the fused kernel, so it implies a fused Adam; a
        float16 gradient scaler must unscale before clipping, which a fused Adam does only in its step."""
        wanted = self.active["gpu_tuning"] or self.active["cuda_graph"]
        return wanted and (trainer is None or str(trainer.precision) != "16-mixed")

    # Lightning hooks ---------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.active = self.resolve(trainer.strategy.root_device, trainer)
        already = getattr(pl_module.build_optimizer, "keywords", {}).get("fused")
        if self.fused_optimizer(trainer) and not already:  # before configure_optimizers builds it
            pl_module.build_optimizer = functools.partial(pl_module.build_optimizer, fused=True)

    def speed_up(self, module: torch.nn.Module) -> None:
        """Apply the resolved switches to a module on its device (training, and `make bench`)."""
        if self.active["gpu_tuning"]:
            torch.backends.cudnn.benchmark = True  # static shapes: pick the fastest conv algorithms once
        mode = None
        if self.active["compile"]:
            graph = self.active["cuda_graph"]
            mode = WITHOUT_CUDA_GRAPHS.get(self.compile_mode, self.compile_mode) if graph else self.compile_mode
        speed_up_module(module, channels_last=self.active["gpu_tuning"], compile_mode=mode)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.speed_up(pl_module)
        if self.active["cuda_graph"]:
            self._install_captured_step(trainer, pl_module)

    def _install_captured_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        guard = next((c for c in trainer.callbacks if isinstance(c, DivergenceGuard)), None)
        if guard is None:
            guard = self._own_guard = DivergenceGuard()
        clip = functools.partial(
            clip_gradients, pl_module.clip_groups(), trainer.gradient_clip_val, trainer.gradient_clip_algorithm
        )
        self.captured_step = CapturedStep(pl_module.training_losses, trainer.optimizers[0], clip, guard)
        epoch_loop = trainer.fit_loop.epoch_loop
        self._replaced = epoch_loop.automatic_optimization
        loop = CapturedOptimization(trainer, self.captured_step, self._replaced.optim_progress)
        epoch_loop.automatic_optimization = loop

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loop = trainer.fit_loop.epoch_loop.automatic_optimization
        if isinstance(loop, CapturedOptimization) and loop.last_losses is not None:
            # a copy: a replayed graph overwrites its outputs in place
            losses = {name: value.clone() for name, value in loop.last_losses.items()}
            loop.last_losses = None
            pl_module.log_training_losses(losses, len(batch["label"]))
        if self._own_guard is not None:
            self._own_guard.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        for state in checkpoint.get("optimizer_states", []):
            for group in state["param_groups"]:
                if isinstance(group["lr"], torch.Tensor):  # a captured step's (make_capturable)
                    group["lr"], group["capturable"] = group["lr"].item(), False  # resumable anywhere

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.on_fit_end(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._replaced is not None:
            trainer.fit_loop.epoch_loop.automatic_optimization = self._replaced
            self._replaced = None
        if self.captured_step is not None:
            self.captured_step.release()
