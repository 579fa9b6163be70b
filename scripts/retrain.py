#!/usr/bin/env python
"""Retrain from labeled production data; the registry's gate decides: exit 0 promoted, 4 refused, 2 bad input.

python scripts/retrain.py --champion registry:NAME@production --registry DIR --log LOG --labels LABELS \
    [--inputs FILE] [--data FILE ...] [--holdout 0.2] [--set key=value ...] --out WORKDIR
"""

import sys

from deepship import cli


def main() -> None:
    sys.exit(cli.main(["retrain", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
