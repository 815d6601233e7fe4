import math

import torch

from cifar_rounds.training.engine import EarlyStopping, GradNorms
from cifar_rounds.training.model import ResNet18


def test_resnet18_has_the_textbook_parameter_count_and_output_shape():
    model = ResNet18()
    assert sum(p.numel() for p in model.parameters()) == 11_173_962
    narrow = ResNet18(width=8)
    assert narrow(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert narrow.conv1.stride == (1, 1) and narrow.conv1.kernel_size == (3, 3)


def test_early_stopping_counts_improvements_larger_than_min_delta():
    stop = EarlyStopping("val_loss", patience=2, min_delta=0.1)
    assert stop.update(1.0, 1)
    assert not stop.update(0.95, 2)  # better, but not by more than min_delta
    assert stop.update(0.85, 3) and stop.best_epoch == 3
    assert not stop.update(0.9, 4) and not stop.should_stop
    assert not stop.update(0.8, 5) and stop.should_stop
    acc = EarlyStopping("val_accuracy", patience=1, min_delta=0.0)
    assert acc.update(0.5, 1) and acc.update(0.6, 2) and not acc.update(0.6, 3) and acc.should_stop


def test_grad_norms_match_torch_total_norm():
    torch.manual_seed(0)
    model = ResNet18(width=4)
    norms = GradNorms(model, steps=2, device=torch.device("cpu"))
    expected = []
    for _ in range(2):
        model.zero_grad()
        model(torch.randn(4, 3, 32, 32)).square().mean().backward()
        expected.append(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item())
        norms.record()
    stats, steps = norms.epoch_summary()
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(steps, expected))
    assert math.isclose(stats["grad_norm_max"], max(expected), rel_tol=1e-5)
    assert {"grad_norm/stem", "grad_norm/layer4.1", "weight_norm/linear"} <= stats.keys()


def test_per_block_norms_see_through_ddp_and_compile(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from cifar_rounds.training.engine import GradNorms, unwrapped

    net = ResNet18(width=4)
    blocks = {"stem", "linear"} | {f"layer{i}.{j}" for i in range(1, 5) for j in range(2)}
    assert unwrapped(torch.compile(net)) is net
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        wrapped = torch.compile(DistributedDataParallel(net))  # as the train stage wraps it under torchrun
        assert unwrapped(wrapped) is net
        assert set(GradNorms(unwrapped(wrapped), 1, torch.device("cpu")).blocks) == blocks
    finally:
        dist.destroy_process_group()
