"""What the founding analysis only theorises, measured: gradient noise scale and loss-landscape sharpness.

Gradient noise scale (McCandlish et al., 2018, "An Empirical Model of
Large-Batch Training", appendix A): for a gradient estimate over B examples,
E|g_B|^2 = |G|^2 + tr(Sigma)/B. Norms at two batch sizes give unbiased
estimates of |G|^2 and tr(Sigma); their exponential moving averages give the
simple noise scale B_simple = tr(Sigma)/|G|^2, which approximates the critical
batch size. With BatchNorm the probe's half batch is normalised by its own
statistics, so the law holds only approximately; the bias this leaves, measured
on a small conv net (benchmarks/diagnostics_cost.py), is in
benchmarks/RESULTS.md.

Sharpness: the top Hessian eigenvalue (power iteration on Hessian-vector
products, stopped at a relative tolerance) and the Hessian trace (Hutchinson's
estimator with Rademacher probes) of the training loss on a fixed subset, in
eval mode; one forward pass and one gradient graph serve every product. SGD is
stable along the sharpest direction only while lambda_max + weight_decay <
stability_bound(lr, momentum, nesterov): 2/lr for plain gradient descent,
2(1+beta)/lr with torch's heavy-ball momentum, 2(1+beta)/(lr(1+2 beta)) with
its Nesterov momentum (derived there).
"""

from __future__ import annotations

import math
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


def stability_bound(lr: float, momentum: float, nesterov: bool) -> float:
    """Largest curvature along which torch.optim.SGD (dampening 0) still converges on a quadratic.

    A quadratic decouples along the Hessian's eigenvectors, so the sharpest direction decides.
    On 0.5 lambda w^2 the gradient is lambda w; write h = lr lambda and u = lr v. A map with
    characteristic polynomial z^2 - T z + D is stable iff |D| < 1, 1 - T + D > 0 and 1 + T + D > 0 (Jury).
    1. Heavy ball, as torch implements it (v <- beta v + g; w <- w - lr v):
       w' = (1 + beta - h) w - beta w_prev, so T = 1 + beta - h, D = beta; 1 + T + D > 0 gives
       lambda < 2(1 + beta)/lr.
    2. Nesterov, as torch implements it (v <- beta v + g; w <- w - lr (g + beta v)):
       (w, u) -> ((1 - h(1 + beta)) w - beta^2 u, h w + beta u), so T = 1 + beta - h(1 + beta),
       D = beta(1 - h); 1 - T + D = h > 0, and 1 + T + D = 2(1 + beta) - h(1 + 2 beta) > 0 gives
       lambda < 2(1 + beta)/(lr(1 + 2 beta)), tighter than |D| < 1 (h < 1 + 1/beta).
    beta = 0 gives gradient descent's 2/lr; at beta = 0.9, 3.8/lr and 1.36/lr (Nesterov is below 2/lr).
    SGD's weight decay is added to the gradient before the momentum buffer, so the optimiser sees
    curvature lambda + weight_decay: compare lambda_max of the loss Hessian plus weight_decay with this.
    """
    if nesterov:
        return 2 * (1 + momentum) / (lr * (1 + 2 * momentum))
    return 2 * (1 + momentum) / lr


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def hvp(loss: torch.Tensor, params: list[torch.Tensor], vectors: list[torch.Tensor]) -> list[torch.Tensor]:
    """One Hessian-vector product, building the gradient graph for it alone (see HessianOperator)."""
    grads = torch.autograd.grad(loss, params, create_graph=True)
    return list(torch.autograd.grad(_dot(grads, vectors), params))


class HessianOperator:
    """v -> Hv for one loss, with the first-order gradient graph built once and reused.

    Building the graph (a forward pass and a create_graph backward) costs half a product in
    FLOPs (ResNet-18: 3.33 and 6.78 GFLOP per image); every product backpropagates through the
    kept graph (retain_graph) instead of rebuilding it, which made a product 1.3x (width 64) to
    1.4x (width 16) cheaper on CPU (benchmarks/RESULTS.md). `products` counts the products.
    """

    def __init__(self, loss: torch.Tensor, params: list[torch.Tensor]) -> None:
        self.params = params
        self.grads = torch.autograd.grad(loss, params, create_graph=True)
        self.products = 0

    def __call__(self, vectors: list[torch.Tensor]) -> list[torch.Tensor]:
        self.products += 1
        return list(torch.autograd.grad(_dot(self.grads, vectors), self.params, retain_graph=True))


def _normalized(vectors: list[torch.Tensor]) -> list[torch.Tensor]:
    norm = torch.sqrt(_dot(vectors, vectors))
    return [v / norm for v in vectors]


def power_iteration(hessian: HessianOperator, iterations: int, tolerance: float, generator: torch.Generator) -> float:
    """Largest eigenvalue by magnitude: at most `iterations` products, fewer once the Rayleigh
    quotient changes by at most `tolerance` times its magnitude between two iterations.

    The relative error left at the stop is about tolerance r^2/(1 - r^2), r = |lambda_2/lambda_1|
    (5 x tolerance at r = 0.91 in tests/unit/test_diagnostics.py); at tolerance 0 only an exact repeat stops it.
    """
    v = _normalized([torch.randn(p.shape, generator=generator).to(p.device, p.dtype) for p in hessian.params])
    eigenvalue = previous = math.nan
    for _ in range(iterations):
        hv = hessian(v)
        eigenvalue = _dot(hv, v).item()  # v has unit norm: the Rayleigh quotient
        if abs(eigenvalue - previous) <= tolerance * abs(eigenvalue):
            break
        previous, v = eigenvalue, _normalized([h.detach() for h in hv])
    return eigenvalue


def hutchinson_trace(hessian: HessianOperator, samples: int, generator: torch.Generator) -> float:
    """Hutchinson: E[v^T H v] = tr(H) for Rademacher v."""
    total = 0.0
    for _ in range(samples):
        v = [(torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(p.device, p.dtype) for p in hessian.params]
        total += _dot(hessian(v), v).item()
    return total / samples


def top_eigenvalue(
    loss_fn: Callable[[], torch.Tensor],
    params: list[torch.Tensor],
    iterations: int,
    generator: torch.Generator,
    *,
    tolerance: float,
) -> float:
    """Largest Hessian eigenvalue (by magnitude) of loss_fn() by power iteration (see power_iteration)."""
    return power_iteration(HessianOperator(loss_fn(), params), iterations, tolerance, generator)


def hessian_trace(
    loss_fn: Callable[[], torch.Tensor], params: list[torch.Tensor], samples: int, generator: torch.Generator
) -> float:
    """Hutchinson's estimate of the trace of loss_fn()'s Hessian (see hutchinson_trace)."""
    return hutchinson_trace(HessianOperator(loss_fn(), params), samples, generator)


def sharpness(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    iterations: int,
    probes: int,
    seed: int,
    *,
    tolerance: float,
) -> dict[str, float]:
    """Top eigenvalue and trace of the Hessian of the mean cross-entropy on (images, labels), eval mode.

    One forward pass and one gradient graph serve every product: at most `iterations` power-iteration
    products (fewer at `tolerance`, see power_iteration) and `probes` Hutchinson products, counted
    in "hessian_vector_products". The model's parameters, buffers and train/eval mode are unchanged.
    """
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    hessian = HessianOperator(nn.functional.cross_entropy(model(images), labels), params)
    generator = torch.Generator().manual_seed(seed)
    out = {
        "lambda_max": power_iteration(hessian, iterations, tolerance, generator),
        "hessian_trace": hutchinson_trace(hessian, probes, generator),
        "hessian_vector_products": float(hessian.products),
    }
    model.train(was_training)
    return out
