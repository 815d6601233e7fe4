"""Reproducible ResNet-18 / CIFAR-10 tuning rounds with DVC and MLflow."""
