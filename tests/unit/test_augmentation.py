import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

from cifar_rounds.data.augment import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CROP_PADDING,
    TrainBatches,
    colour_channels,
    crop_and_flip,
    draw_epoch,
    normalize,
    pack_padded,
)


def test_crop_and_flip_equals_torchvision_on_each_image():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=g)
    draws = draw_epoch(16, g, crop=True, flip=True)
    pixels = crop_and_flip(pack_padded(images), torch.arange(16), draws.dy, draws.dx, draws.flip)
    assert (pixels[..., 3] == 0).all()  # the padding byte of each packed pixel
    out = colour_channels(pixels)
    for i in range(16):
        ref = TF.crop(TF.pad(images[i], [CROP_PADDING]), int(draws.dy[i]), int(draws.dx[i]), 32, 32)
        ref = TF.horizontal_flip(ref) if draws.flip[i] else ref
        assert torch.equal(out[i], ref)
    assert normalize(out).is_contiguous(memory_format=torch.channels_last)


def test_offsets_and_flips_match_torchvision_distributions():
    # RandomCrop(32, padding=4) draws each offset uniformly from 0..8; RandomHorizontalFlip flips with p=0.5
    draws = draw_epoch(90_000, torch.Generator().manual_seed(1), crop=True, flip=True)
    for offsets in (draws.dx, draws.dy):
        counts = np.bincount(offsets.numpy(), minlength=9)
        expected = 90_000 / 9
        chi2 = ((counts - expected) ** 2 / expected).sum()
        assert len(counts) == 9 and chi2 < 26.1  # chi-square, 8 dof, p = 0.001
    assert abs(draws.flip.float().mean().item() - 0.5) < 0.01
    assert np.corrcoef(draws.dx.numpy(), draws.dy.numpy())[0, 1] < 0.02
    still = draw_epoch(1000, torch.Generator().manual_seed(1), crop=False, flip=False)
    assert (still.dx == CROP_PADDING).all() and not still.flip.any()


def test_normalize_uses_the_cifar10_statistics():
    x = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1).expand(1, 3, 2, 2) * 255
    assert normalize(x.round().to(torch.uint8)).abs().max() < 0.01
    one_std = ((torch.tensor(CIFAR10_MEAN) + torch.tensor(CIFAR10_STD)) * 255).view(1, 3, 1, 1)
    assert torch.allclose(normalize(one_std.expand(1, 3, 2, 2)), torch.ones(1, 3, 2, 2), atol=1e-5)


def test_an_epoch_visits_distinct_images_in_full_batches():
    images = torch.arange(50, dtype=torch.uint8).view(50, 1, 1, 1).expand(50, 3, 32, 32).contiguous()
    batches = TrainBatches(images, torch.arange(50), batch_size=16, crop=False, flip=False)
    seen = torch.cat([y for _, y in batches.epoch(torch.Generator().manual_seed(0))])
    assert len(batches) == 3 and len(seen) == 48 and len(set(seen.tolist())) == 48


def test_training_batches_equal_torchvision_crop_flip_to_tensor_normalize():
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    batches = TrainBatches(images, torch.arange(40), batch_size=20, crop=True, flip=True)
    x, y = next(batches.epoch(torch.Generator().manual_seed(7)))
    draws = draw_epoch(40, torch.Generator().manual_seed(7), crop=True, flip=True)  # what that epoch drew
    assert x.is_contiguous(memory_format=torch.channels_last)
    for j, i in enumerate(y.tolist()):  # labels are image indices here
        ref = TF.crop(TF.pad(images[i], [CROP_PADDING]), int(draws.dy[j]), int(draws.dx[j]), 32, 32)
        ref = TF.horizontal_flip(ref) if draws.flip[j] else ref
        assert torch.allclose(x[j], TF.normalize(ref.float() / 255, CIFAR10_MEAN, CIFAR10_STD), atol=1e-5)
