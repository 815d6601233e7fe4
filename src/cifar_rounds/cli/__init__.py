"""The `cifar-rounds` command: what a user does (run, report, sweep, promote, show, check, demo, relocate)."""
