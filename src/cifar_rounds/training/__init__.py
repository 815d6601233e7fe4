"""Training: the model, the loops, diagnostics, checkpoints, where records go, the device and torchrun."""
