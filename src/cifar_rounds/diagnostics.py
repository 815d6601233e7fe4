"""What the seed only theorises, measured: gradient noise scale and loss-landscape sharpness.

Gradient noise scale (McCandlish et al., 2018, "An Empirical Model of
Large-Batch Training", appendix A): for a gradient estimate over B examples,
E|g_B|^2 = |G|^2 + tr(Sigma)/B. Norms at two batch sizes give unbiased
estimates of |G|^2 and tr(Sigma); their exponential moving averages give the
simple noise scale B_simple = tr(Sigma)/|G|^2, which approximates the critical
batch size.

Sharpness: the top Hessian eigenvalue (power iteration on Hessian-vector
products) and the Hessian trace (Hutchinson's estimator with Rademacher
probes) of the training loss on a fixed subset, in eval mode. Plain gradient
descent is stable only while lambda_max < 2/lr (SGD with momentum beta:
2(1+beta)/lr).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


def unbiased_norm_estimates(small_sq: float, big_sq: float, b_small: int, b_big: int) -> tuple[float, float]:
    """(|G|^2, tr(Sigma)) from squared gradient norms at batch sizes b_small < b_big."""
    g_sq = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace_sigma = (small_sq - big_sq) / (1 / b_small - 1 / b_big)
    return g_sq, trace_sigma


@dataclass
class NoiseScale:
    """Exponential moving averages of the two estimates; B_simple is their ratio."""

    decay: float
    g_sq: float = 0.0
    trace_sigma: float = 0.0
    updates: int = 0

    def update(self, small_sq: float, big_sq: float, b_small: int, b_big: int) -> None:
        g_sq, trace_sigma = unbiased_norm_estimates(small_sq, big_sq, b_small, b_big)
        self.g_sq = self.decay * self.g_sq + (1 - self.decay) * g_sq
        self.trace_sigma = self.decay * self.trace_sigma + (1 - self.decay) * trace_sigma
        self.updates += 1

    @property
    def b_simple(self) -> float:
        # the EMAs start at zero with the same bias factor, which cancels in the ratio
        return self.trace_sigma / self.g_sq if self.g_sq > 0 else float("nan")


def bn_buffers(model: nn.Module) -> list[torch.Tensor]:
    return [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers()]


class SmallBatchProbe:
    """Every `interval` steps, the squared gradient norm of half the batch, before the real step.

    The half-batch pass leaves parameters, gradients and batch-norm running
    statistics as they were, so the training trajectory is unchanged.
    """

    def __init__(self, model: nn.Module, interval: int) -> None:
        self.model, self.interval = model, interval
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.small_sq: list[torch.Tensor] = []
        self.b_small = 0

    def due(self, step: int) -> bool:
        return step % self.interval == 0

    def measure(self, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable, autocast) -> None:
        saved = [b.clone() for b in bn_buffers(self.model)]
        half = self.b_small = len(y) // 2
        with autocast:
            loss = loss_fn(self.model(x[:half]), y[:half])
        grads = torch.autograd.grad(loss, self.params)
        self.small_sq.append(torch.stack(torch._foreach_norm(grads)).square().sum())
        torch._foreach_copy_(bn_buffers(self.model), saved)

    def results(self, big_sq: torch.Tensor, b_big: int) -> list[tuple[float, float, int, int]]:
        """(small_sq, big_sq, b_small, b_big) per measurement of the epoch, then starts afresh.

        `big_sq` holds every step's squared norm of the full (all-reduced) gradient.
        """
        small = torch.stack(self.small_sq).float().cpu().tolist() if self.small_sq else []
        big = big_sq[:: self.interval][: len(small)].float().cpu().tolist()
        self.small_sq = []
        return [(s, b, self.b_small, b_big) for s, b in zip(small, big)]


def hvp(loss: torch.Tensor, params: list[torch.Tensor], vectors: list[torch.Tensor]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, params, create_graph=True)
    dot = sum((g * v).sum() for g, v in zip(grads, vectors))
    return list(torch.autograd.grad(dot, params))


def _normalized(vectors: list[torch.Tensor]) -> list[torch.Tensor]:
    norm = torch.sqrt(sum((v * v).sum() for v in vectors))
    return [v / norm for v in vectors]


def top_eigenvalue(loss_fn: Callable[[], torch.Tensor], params: list[torch.Tensor], iterations: int,
                   generator: torch.Generator) -> float:
    """Largest Hessian eigenvalue (by magnitude) of loss_fn() by power iteration."""
    v = _normalized([torch.randn(p.shape, generator=generator).to(p.device) for p in params])
    eigenvalue = 0.0
    for _ in range(iterations):
        hv = hvp(loss_fn(), params, v)
        eigenvalue = sum((h * u).sum() for h, u in zip(hv, v)).item()
        v = _normalized([h.detach() for h in hv])
    return eigenvalue


def hessian_trace(loss_fn: Callable[[], torch.Tensor], params: list[torch.Tensor], samples: int,
                  generator: torch.Generator) -> float:
    """Hutchinson: E[v^T H v] = tr(H) for Rademacher v."""
    total = 0.0
    for _ in range(samples):
        v = [(torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(p.device, p.dtype) for p in params]
        hv = hvp(loss_fn(), params, v)
        total += sum((h * u).sum() for h, u in zip(hv, v)).item()
    return total / samples


def sharpness(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, iterations: int, probes: int,
              seed: int) -> dict[str, float]:
    """Top eigenvalue and trace of the Hessian of the mean cross-entropy on (images, labels), eval mode."""
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    loss_fn = lambda: nn.functional.cross_entropy(model(images), labels)  # noqa: E731
    generator = torch.Generator().manual_seed(seed)
    return {
        "lambda_max": top_eigenvalue(loss_fn, params, iterations, generator),
        "hessian_trace": hessian_trace(loss_fn, params, probes, generator),
    }
