"""CIFAR-10 data: the archive format, the split's arrays, batched augmentation, generated archives."""
