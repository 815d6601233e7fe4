"""The DVC stages (download, split, train, evaluate): argparse and main() only."""
