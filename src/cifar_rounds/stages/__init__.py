"""The DVC stages (download, split, train, evaluate) and the offline demo: argparse and main() only."""
