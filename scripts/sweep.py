#!/usr/bin/env python
"""Hyperparameter sweep: python scripts/sweep.py --config SWEEP.yaml [--resume] [--best DIR] [--export OUT]"""

import sys

from deepship import cli


def main() -> None:
    sys.exit(cli.main(["sweep", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
