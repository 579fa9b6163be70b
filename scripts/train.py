#!/usr/bin/env python
"""Fine-tune a classifier: python scripts/train.py --config CONFIG.yaml [--set key=value ...]"""

import sys

from deepship import cli


def main() -> None:
    sys.exit(cli.main(["train", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
