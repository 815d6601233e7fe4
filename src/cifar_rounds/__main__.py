"""`python -m cifar_rounds`: the `cifar-rounds` command."""

from cifar_rounds.cli.main import entry

if __name__ == "__main__":
    entry()
