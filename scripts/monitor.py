#!/usr/bin/env python
"""Monitor a package: drift and performance per window of a prediction log or dataset; exit 3 on an alert.

python scripts/monitor.py --package DIR --current LOG_OR_DATA --out REPORT_DIR [--labels FILE]
"""

import sys

from deepship import cli


def main() -> None:
    sys.exit(cli.main(["monitor", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
