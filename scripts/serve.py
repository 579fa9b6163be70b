#!/usr/bin/env python
"""Serve a model package over HTTP (no torch needed).

python scripts/serve.py --package DIR [--host 127.0.0.1] [--port 8000] [--workers N]
"""

import sys

from deepship import cli


def main() -> None:
    sys.exit(cli.main(["serve", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
