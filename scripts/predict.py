#!/usr/bin/env python
"""Predict with a model package (no torch needed), JSONL out.

python scripts/predict.py --package DIR --input FILE_OR_DIR [--output preds.jsonl]
"""

import sys

from deepship import cli


def main() -> None:
    sys.exit(cli.main(["predict", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
