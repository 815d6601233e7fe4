"""Noise scale and sharpness on models where the truth is known, and no effect on training."""

import contextlib
import math

import numpy as np
import pytest
import torch
from torch import nn

from cifar_rounds.data.augment import TrainBatches
from cifar_rounds.training.diagnostics import (
    HessianOperator,
    NoiseScale,
    SmallBatchProbe,
    bn_buffers,
    hessian_trace,
    hvp,
    power_iteration,
    sharpness,
    stability_bound,
    top_eigenvalue,
    unbiased_norm_estimates,
)
from cifar_rounds.training.engine import train_one_epoch
from cifar_rounds.training.model import build_model
from cifar_rounds.training.runtime import memory_format


@pytest.fixture
def least_squares():
    """0.5 * mean((Xw - y)^2): Hessian X^T X / n, per-example gradients x_i (x_i.w - y_i)."""
    g = torch.Generator().manual_seed(0)
    n, d = 256, 8
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3, d, dtype=torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():  # weights from the seeded generator: the test must not depend on test order
        model.weight.copy_(torch.randn(1, d, generator=g, dtype=torch.float64))
    loss_fn = lambda idx=slice(None): 0.5 * (model(x[idx]).squeeze(1) - y[idx]).square().mean()  # noqa: E731
    return model, x, y, loss_fn


def test_power_iteration_finds_the_exact_top_eigenvalue(least_squares):
    model, x, _, loss_fn = least_squares
    exact = np.linalg.eigvalsh((x.T @ x / len(x)).numpy()).max()
    found = top_eigenvalue(loss_fn, list(model.parameters()), 200, torch.Generator().manual_seed(1), tolerance=0.0)
    assert found == pytest.approx(exact, rel=1e-6)


def test_power_iteration_stops_at_the_relative_tolerance(least_squares):
    model, x, _, loss_fn = least_squares
    exact = np.linalg.eigvalsh((x.T @ x / len(x)).numpy()).max()
    hessian = HessianOperator(loss_fn(), list(model.parameters()))
    found = power_iteration(hessian, 200, 1e-10, torch.Generator().manual_seed(1))
    # the top two eigenvalues are 9% apart, so convergence is slow: the tolerance, not the cap, ends it
    assert hessian.products < 180
    assert found == pytest.approx(exact, rel=1e-8)


def test_hutchinson_trace_is_within_three_standard_errors(least_squares):
    model, x, _, loss_fn = least_squares
    h = (x.T @ x / len(x)).numpy()
    samples = 400
    # Rademacher probes: Var(v^T H v) = 2 (||H||_F^2 - sum_i H_ii^2)
    stderr = math.sqrt(2 * ((h**2).sum() - (np.diag(h) ** 2).sum()) / samples)
    found = hessian_trace(loss_fn, list(model.parameters()), samples, torch.Generator().manual_seed(2))
    assert abs(found - np.trace(h)) < 3 * stderr


def _exact_noise(model, x, y):
    w = model.weight.detach().squeeze(0)
    per_example = x * (x @ w - y)[:, None]
    mean = per_example.mean(0)
    return per_example, mean.square().sum().item(), (per_example - mean).square().sum(1).mean().item()


def test_noise_estimators_recover_exact_g_squared_and_trace_sigma(least_squares):
    model, x, y, loss_fn = least_squares
    per_example, g_sq, trace_sigma = _exact_noise(model, x, y)
    # in expectation, with replacement: E|g_b|^2 = |G|^2 + tr(Sigma)/b; the estimators invert that exactly
    assert unbiased_norm_estimates(g_sq + trace_sigma / 8, g_sq + trace_sigma / 32, 8, 32) == pytest.approx(
        (g_sq, trace_sigma), rel=1e-9
    )
    # and from real autograd gradients of sampled batches, averaged
    gen = torch.Generator().manual_seed(3)
    norms = {}
    for b in (8, 32):
        total = 0.0
        for _ in range(3000):
            idx = torch.randint(0, len(x), (b,), generator=gen)
            (grad,) = torch.autograd.grad(loss_fn(idx), model.parameters())
            total += grad.square().sum().item()
        norms[b] = total / 3000
    est_g_sq, est_trace = unbiased_norm_estimates(norms[8], norms[32], 8, 32)
    assert est_trace == pytest.approx(trace_sigma, rel=0.05)
    assert est_g_sq == pytest.approx(g_sq, rel=0.05, abs=0.05 * trace_sigma / 32)


def test_the_probe_normalises_its_half_batch_by_the_half_batch_statistics():
    """Where its BatchNorm bias comes from (measured in benchmarks/diagnostics_cost.py, see diagnostics.py)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    probe = SmallBatchProbe(model, interval=1)
    running = [b.clone() for b in bn_buffers(model)]
    probe.measure(x, y, nn.functional.cross_entropy, contextlib.nullcontext())
    assert all(torch.equal(a, b) for a, b in zip(running, bn_buffers(model)))
    own = torch.autograd.grad(nn.functional.cross_entropy(model(x[:8]), y[:8]), list(model.parameters()))
    assert probe.small_sq[0].item() == pytest.approx(sum(g.square().sum().item() for g in own), rel=1e-6)


def test_noise_scale_is_the_ratio_of_the_moving_averages():
    noise = NoiseScale(decay=0.5)
    for _ in range(3):
        noise.update(small_sq=3.0, big_sq=2.0, b_small=8, b_big=16)  # |G|^2 = 1, tr(Sigma) = 16
    assert noise.g_sq == pytest.approx(0.875) and noise.b_simple == pytest.approx(16.0)


def _one_epoch(probe_on: bool):
    torch.manual_seed(0)
    model = build_model(4, 10, torch.device("cpu"), memory_format(4, torch.device("cpu")))  # as the stages build it
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (96, 3, 32, 32), dtype=torch.uint8, generator=g)
    batches = TrainBatches(images, torch.randint(0, 10, (96,), generator=g), 16, True, True)
    probe = SmallBatchProbe(model, interval=2) if probe_on else None
    result = train_one_epoch(model, optimizer, batches.epoch(g), len(batches), torch.device("cpu"), None, probe=probe)
    samples = probe.results(torch.tensor(result.step_grad_norms).square(), 16) if probe else []
    return model, samples


def test_measuring_does_not_change_the_training_trajectory():
    plain, _ = _one_epoch(False)
    probed, samples = _one_epoch(True)
    assert len(samples) == 3 and all(s[2:] == (8, 16) for s in samples)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), probed.state_dict().values()))
    before = [t.clone() for t in probed.state_dict().values()]
    x = torch.randn(8, 3, 32, 32)  # the model computes in its own layout
    out = sharpness(probed, x, torch.arange(8), iterations=2, probes=1, seed=0, tolerance=0.0)
    assert math.isfinite(out["lambda_max"]) and math.isfinite(out["hessian_trace"])
    assert all(torch.equal(a, b) for a, b in zip(before, probed.state_dict().values()))


def _fresh_graph_sharpness(model, images, labels, iterations, probes, seed):
    """The measurement as it was: a forward pass and a gradient graph of its own for every product."""
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    loss_fn = lambda: nn.functional.cross_entropy(model(images), labels)  # noqa: E731
    generator = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=generator) for p in params]
    v = [t / math.sqrt(sum(u.square().sum().item() for u in v)) for t in v]
    for _ in range(iterations):
        hv = hvp(loss_fn(), params, v)
        eigenvalue = sum((h * u).sum() for h, u in zip(hv, v)).item()
        v = [t / math.sqrt(sum(u.square().sum().item() for u in hv)) for t in hv]
    trace = 0.0
    for _ in range(probes):
        r = [(torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).float() for p in params]
        trace += sum((h * u).sum() for h, u in zip(hvp(loss_fn(), params, r), r)).item() / probes
    return eigenvalue, trace


def test_sharpness_reuses_one_forward_pass_and_matches_fresh_graphs():
    torch.manual_seed(0)
    model = build_model(4, 10, torch.device("cpu"), memory_format(4, torch.device("cpu")))  # as the stages build it
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.arange(8)
    eigenvalue, trace = _fresh_graph_sharpness(model, x, y, iterations=3, probes=2, seed=5)
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    model.train()
    out = sharpness(model, x, y, iterations=3, probes=2, seed=5, tolerance=0.0)
    assert len(forwards) == 1 and out["hessian_vector_products"] == 5 and model.training
    assert out["lambda_max"] == pytest.approx(eigenvalue, rel=1e-5)
    assert out["hessian_trace"] == pytest.approx(trace, rel=1e-5)


def _sgd_on_quadratic(curvatures: list[float], lr: float, nesterov: bool, weight_decay: float = 0.0) -> float:
    """max |w| after 1,000 steps of the real torch.optim.SGD (momentum 0.9) on sum 0.5 c_i w_i^2 from w = 1."""
    w = nn.Parameter(torch.ones(len(curvatures), dtype=torch.float64))
    c = torch.tensor(curvatures, dtype=torch.float64)
    optimizer = torch.optim.SGD([w], lr=lr, momentum=0.9, nesterov=nesterov, weight_decay=weight_decay)
    for _ in range(1000):
        optimizer.zero_grad()
        (0.5 * (c * w * w).sum()).backward()
        optimizer.step()
    return w.detach().abs().max().item()


@pytest.mark.parametrize("nesterov", [False, True])
def test_stability_bound_separates_convergence_from_divergence(nesterov):
    lr = 0.1
    bound = stability_bound(lr, 0.9, nesterov)
    assert bound == pytest.approx(1.357142857 / lr if nesterov else 3.8 / lr)
    # a diagonal quadratic: flat directions too, the sharpest one at the given fraction of the bound
    assert _sgd_on_quadratic([0.01 * bound, 0.3 * bound, 0.98 * bound], lr, nesterov) < 1e-6
    assert _sgd_on_quadratic([0.01 * bound, 0.3 * bound, 1.02 * bound], lr, nesterov) > 1e6


def test_two_over_lr_is_not_the_bound_with_momentum():
    lr = 0.1
    # heavy ball converges between 2/lr and 3.8/lr; Nesterov diverges between 1.36/lr and 2/lr
    assert _sgd_on_quadratic([3.0 / lr], lr, nesterov=False) < 1e-6
    assert _sgd_on_quadratic([1.7 / lr], lr, nesterov=True) > 1e6


def test_weight_decay_adds_to_the_curvature_the_optimiser_sees():
    lr, wd = 0.1, 2.0
    bound = stability_bound(lr, 0.9, nesterov=False)
    assert _sgd_on_quadratic([0.98 * bound - wd], lr, False, weight_decay=wd) < 1e-6
    # below the bound on its own, above it with the decay added
    assert _sgd_on_quadratic([1.02 * bound - wd], lr, False, weight_decay=wd) > 1e6
