"""Training and evaluation loops: plain PyTorch, metric dicts out, no tracking inside.

The hot loop keeps everything on the device: losses, correct counts and
gradient norms accumulate in device tensors and reach the host once an epoch.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from cifar_rounds.training.diagnostics import SmallBatchProbe
from cifar_rounds.training.model import block_name


class GradNorms:
    """Global L2 gradient norm of every step, and per-block RMS norms over an epoch.

    One fused `_foreach_norm` per step over all gradients (after backward,
    before the update); no host synchronisation until `epoch_summary`.
    """

    def __init__(self, model: nn.Module, steps: int, device: torch.device) -> None:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.blocks = list(dict.fromkeys(block_name(n) for n in names))
        self.block_of = torch.tensor([self.blocks.index(block_name(n)) for n in names], device=device)
        self.step_norms = torch.zeros(steps, device=device)
        self.sq_sum = torch.zeros(len(self.params), device=device)
        self.steps = 0

    def record(self) -> None:
        grads = [p.grad for p in self.params]
        sq = torch.stack(torch._foreach_norm(grads)).square()
        self.sq_sum += sq
        self.step_norms[self.steps] = sq.sum().sqrt()
        self.steps += 1

    def epoch_summary(self) -> tuple[dict[str, float], list[float]]:
        """Epoch statistics, and the per-step norms (host floats)."""
        steps = self.step_norms[: self.steps].float().cpu()
        per_block = torch.zeros(len(self.blocks), device=self.sq_sum.device)
        per_block.index_add_(0, self.block_of, self.sq_sum / max(self.steps, 1))
        weights = torch.zeros(len(self.blocks), device=self.sq_sum.device)
        weights.index_add_(0, self.block_of, torch.stack(torch._foreach_norm(self.params)).square())
        stats = {
            "grad_norm_mean": steps.mean().item(),
            "grad_norm_max": steps.max().item(),
            "grad_norm_last": steps[-1].item(),
        }
        for name, g, w in zip(self.blocks, per_block.sqrt().tolist(), weights.sqrt().tolist()):
            stats[f"grad_norm/{name}"] = g
            stats[f"weight_norm/{name}"] = w
        return stats, steps.tolist()


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def unwrapped(model: nn.Module) -> nn.Module:
    """The plain module inside DDP and torch.compile wrappers, whose parameter names are the model's own."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None and isinstance(model, nn.parallel.DistributedDataParallel):
            inner = model.module
        if inner is None:
            return model
        model = inner


@dataclass
class EpochResult:
    metrics: dict[str, float]
    step_grad_norms: list[float] = field(default_factory=list)  # global L2 norm of every step's gradient
    first_bad_step: int | None = None  # first step whose loss was not finite


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    probe: SmallBatchProbe | None = None,
    grad_norms: bool = True,
) -> EpochResult:
    """One pass over `batches` (at most `steps` of them); losses, accuracy and gradient norms.

    With a `probe`, every probe.interval steps a half-batch gradient is measured
    first; the probe pairs it with the step's norm afterwards (SmallBatchProbe.results).
    `grad_norms=False` skips the norms (to measure their cost).
    """
    model.train()
    norms = GradNorms(unwrapped(model), steps, device) if grad_norms else None
    losses = torch.zeros(steps, device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for step, (x, y) in enumerate(itertools.islice(batches, steps)):
        if probe and probe.due(step):
            probe.measure(x, y, F.cross_entropy, autocast(device, amp_dtype))
        with autocast(device, amp_dtype):
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if norms:
            norms.record()
        optimizer.step()
        losses[step] = loss.detach()
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
    grad_stats, step_norms = norms.epoch_summary() if norms else ({}, [])
    host_losses = losses.cpu()
    bad = (~torch.isfinite(host_losses)).nonzero()
    metrics = {"train_loss": host_losses.mean().item(), "train_accuracy": correct.item() / max(seen, 1)}
    return EpochResult({**metrics, **grad_stats}, step_norms, int(bad[0]) if len(bad) else None)


@torch.inference_mode()
def predict(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    amp_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example losses and predicted classes (host tensors), in eval mode."""
    model.eval()
    losses, preds = [], []
    for x, y in batches:
        with autocast(device, amp_dtype):
            logits = model(x)
        losses.append(F.cross_entropy(logits.float(), y, reduction="none"))
        preds.append(logits.argmax(1))
    return torch.cat(losses).cpu(), torch.cat(preds).cpu()


def scores(losses: torch.Tensor, preds: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """{loss, accuracy} of per-example losses and predictions; the caller names the split."""
    return {"loss": losses.mean().item(), "accuracy": (preds == labels.cpu()).float().mean().item()}


def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    labels: torch.Tensor,
    device: torch.device,
    amp_dtype: torch.dtype | None,
) -> dict[str, float]:
    """{loss, accuracy} of `model` on `batches`, whose labels are `labels`."""
    return scores(*predict(model, batches, device, amp_dtype), labels)


@dataclass
class EarlyStopping:
    """Stop after `patience` epochs without improving by more than `min_delta` (as Keras/Lightning)."""

    monitor: str
    patience: int
    min_delta: float
    best: float = math.nan
    best_epoch: int = 0
    bad_epochs: int = 0

    @property
    def sign(self) -> float:
        return 1.0 if self.monitor == "val_loss" else -1.0  # loss improves downwards, accuracy upwards

    def update(self, value: float, epoch: int) -> bool:
        """Record an epoch's value; True if it is a new best."""
        if math.isnan(self.best) or self.sign * (self.best - value) > self.min_delta:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience
