#!/usr/bin/env python
"""Learning curve: python scripts/learning_curve.py --config CONFIG.yaml --fractions 0.1,0.25,0.5,1.0 [--set ...]"""

import sys

from deepship import cli


def main() -> None:
    sys.exit(cli.main(["learning-curve", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
