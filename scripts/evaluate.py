#!/usr/bin/env python
"""Evaluate a model package on labeled data: report.json + report.html; exit 4 when a gate fails.

python scripts/evaluate.py --package DIR --data FILE_OR_DIR --out REPORT_DIR [--compare DIR] [--baseline tfidf]
"""

import sys

from deepship import cli


def main() -> None:
    sys.exit(cli.main(["evaluate", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
