#!/usr/bin/env python
"""Benchmarks: python scripts/bench.py NAME [options], the same as `deepship bench NAME` (see --help)."""

import sys

from deepship import cli


def main() -> None:
    sys.exit(cli.main(["bench", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
