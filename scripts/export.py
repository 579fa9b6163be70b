#!/usr/bin/env python
"""Export a run to a gated ONNX model package.

python scripts/export.py --run RUN_DIR --out PACKAGE_DIR [--quantize int8] [--opset N]
"""

import sys

from deepship import cli


def main() -> None:
    sys.exit(cli.main(["export", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
