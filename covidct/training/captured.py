"""The whole training step (forward, backward, clipping, optimizer update) replayed as one CUDA graph.

At the paper's batch of 16+16 a GPU runs a step's few thousand kernels faster than Python can launch
them, so the step is bound by the host. A captured graph launches all of them with one call. This needs
a step with static shapes, no host syncs and no Python state that changes from step to step: batches
declare their site blocks (models/routing.py), the divergence flag stays on the device, the optimizer is
fused and capturable with its learning rate in a device tensor (so schedulers still change it), and
whatever else a loss reads lives in tensors updated in place (e.g. MS-Net's transfer weight, a buffer).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from covidct.training.divergence import RAN, SKIPPED, DivergenceGuard, is_fused

Batch = Mapping[str, Any]
LossFunction = Callable[[Batch], dict[str, torch.Tensor]]
GraphKey = tuple[Any, ...]
GRAPH_INPUTS = ("image", "label", "site")


class CapturedStep:
    """One optimizer step of `losses(batch)["loss"]`, eager until `warmup` consecutive batches share a key
    (site layout and shapes), then captured once and replayed for every batch with that key.

    A batch with another key runs eagerly, with the same numerics; the graph is recaptured once a new
    key has held for `warmup` steps. A batch that declares no site layout always runs eagerly: routing it
    needs host syncs. Gradients are written, not accumulated, by both. Off CUDA (or with capture=False)
    every step runs eagerly, which is how the CPU tests and the eager bench run the same code. Returns
    each step's detached loss terms.
    """

    def __init__(
        self,
        losses: LossFunction,
        optimizer: torch.optim.Optimizer,
        clip: Callable[[], None],
        guard: DivergenceGuard,
        capture: bool = True,
        warmup: int = 3,
    ):
        self.losses, self.optimizer, self.clip, self.guard = losses, optimizer, clip, guard
        self.warmup = warmup
        self.capture = capture and optimizer.param_groups[0]["params"][0].is_cuda
        self.captures = 0  # how many graphs were captured (tests and the bench read it)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_key: GraphKey | None = None
        # inputs, outputs and the optimizer's skip flag: what the graph reads and writes, kept alive
        self._static: tuple[dict[str, Any], dict[str, torch.Tensor], torch.Tensor, torch.Tensor] | None = None
        self._candidate: GraphKey | None = None
        self._streak = 0

    def release(self) -> None:
        """Free the graph's memory pool (at the end of a fit)."""
        self._graph = self._static = self._graph_key = None

    @staticmethod
    def key(batch: Batch) -> GraphKey:
        shapes = tuple((tuple(batch[k].shape), batch[k].dtype) for k in GRAPH_INPUTS)
        return (batch.get("site_layout"), shapes)

    def __call__(self, batch: Batch, epoch: int = 0, step: int = 0) -> dict[str, torch.Tensor]:
        losses, report = self._run(batch)
        self.guard.track(report, list(losses), epoch, step, SKIPPED if is_fused(self.optimizer) else RAN)
        return losses

    def _run(self, batch: Batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        key = self.key(batch)
        if self._graph is not None and key == self._graph_key:
            inputs, losses, report, _ = self._static
            for name in GRAPH_INPUTS:
                inputs[name].copy_(batch[name], non_blocking=True)
            self._graph.replay()
            return losses, report
        self._streak = self._streak + 1 if key == self._candidate else 1
        self._candidate = key
        if self.capture and self._streak > self.warmup and key[0] is not None:
            self._capture(batch, key)
            return self._run(batch)
        return self._eager(batch)

    def _eager(self, batch: Batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        if not self.capture:
            return self._step(batch)
        # on a side stream, as CUDA graph warm-up must run (lazy library state is set up outside capture)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            out = self._step(batch)
        torch.cuda.current_stream().wait_stream(stream)
        return out

    def _capture(self, batch: Batch, key: GraphKey) -> None:
        self._graph = self._static = None  # frees the previous graph's memory pool
        make_capturable(self.optimizer)  # here, after Lightning has restored a resumed optimizer's state
        inputs = {**batch, **{name: batch[name].clone() for name in GRAPH_INPUTS}}
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        # thread_local: the DataLoader's pin-memory thread may call CUDA while this thread captures
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            losses, report = self._step(inputs)
        self._graph, self._graph_key = graph, key
        self._static = (inputs, losses, report, self.optimizer.found_inf)
        self.captures += 1

    def _step(self, batch: Batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The step as automatic optimization takes it; Lightning's autocast is kept, minus its cast
        cache, which graph capture cannot use."""
        optimizer = self.optimizer
        optimizer.zero_grad(set_to_none=True)  # backward then writes fresh gradients, inside a graph too
        device = batch["image"].device.type
        autocast = torch.autocast(
            device,
            dtype=torch.get_autocast_dtype(device),
            enabled=torch.is_autocast_enabled(device),
            cache_enabled=False,
        )
        with autocast:
            losses = self.losses(batch)
        report = self.guard.flag(losses, optimizer)
        losses["loss"].backward()
        self.clip()
        optimizer.step()
        return {name: value.detach() for name, value in losses.items()}, report


def make_capturable(optimizer: torch.optim.Optimizer) -> None:
    """Let `optimizer.step()` run inside a graph: capturable state, and the learning rate in a device
    tensor that schedulers update in place (a float would be frozen into the graph)."""
    for group in optimizer.param_groups:
        device = group["params"][0].device
        group["capturable"] = True
        lr = group["lr"]
        if not isinstance(lr, torch.Tensor) or lr.device != device:
            group["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=device)
