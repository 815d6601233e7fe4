"""Noise scale and sharpness on models where the truth is known, and no effect on training."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from cifar_rounds.diagnostics import NoiseScale, SmallBatchProbe, hessian_trace, sharpness, top_eigenvalue, unbiased_norm_estimates
from cifar_rounds.engine import train_one_epoch
from cifar_rounds.model import ResNet18
from cifar_rounds.pipeline import TrainBatches


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
    found = top_eigenvalue(loss_fn, list(model.parameters()), 200, torch.Generator().manual_seed(1))
    assert found == pytest.approx(exact, rel=1e-6)


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
    assert unbiased_norm_estimates(g_sq + trace_sigma / 8, g_sq + trace_sigma / 32, 8, 32) == pytest.approx((g_sq, trace_sigma), rel=1e-9)
    # and from real autograd gradients of sampled batches, averaged
    gen = torch.Generator().manual_seed(3)
    norms = {}
    for b in (8, 32):
        total = 0.0
        for _ in range(3000):
            idx = torch.randint(0, len(x), (b,), generator=gen)
            grad, = torch.autograd.grad(loss_fn(idx), model.parameters())
            total += grad.square().sum().item()
        norms[b] = total / 3000
    est_g_sq, est_trace = unbiased_norm_estimates(norms[8], norms[32], 8, 32)
    assert est_trace == pytest.approx(trace_sigma, rel=0.05)
    assert est_g_sq == pytest.approx(g_sq, rel=0.05, abs=0.05 * trace_sigma / 32)


def test_noise_scale_is_the_ratio_of_the_moving_averages():
    noise = NoiseScale(decay=0.5)
    for _ in range(3):
        noise.update(small_sq=3.0, big_sq=2.0, b_small=8, b_big=16)  # |G|^2 = 1, tr(Sigma) = 16
    assert noise.g_sq == pytest.approx(0.875) and noise.b_simple == pytest.approx(16.0)


def _one_epoch(probe_on: bool):
    torch.manual_seed(0)
    model = ResNet18(width=4).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (96, 3, 32, 32), dtype=torch.uint8, generator=g)
    batches = TrainBatches(images, torch.randint(0, 10, (96,), generator=g), 16, True, True)
    probe = SmallBatchProbe(model, interval=2) if probe_on else None
    result = train_one_epoch(model, optimizer, batches.epoch(g), len(batches), torch.device("cpu"), probe=probe, global_batch=16)
    return model, result


def test_measuring_does_not_change_the_training_trajectory():
    plain, _ = _one_epoch(False)
    probed, result = _one_epoch(True)
    assert len(result.noise_samples) == 3 and all(s[2:] == (8, 16) for s in result.noise_samples)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), probed.state_dict().values()))
    before = [t.clone() for t in probed.state_dict().values()]
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    out = sharpness(probed, x, torch.arange(8), iterations=2, probes=1, seed=0)
    assert math.isfinite(out["lambda_max"]) and math.isfinite(out["hessian_trace"])
    assert all(torch.equal(a, b) for a, b in zip(before, probed.state_dict().values()))
