#!/usr/bin/env python
"""Model registry: register, list, show, alias, promote (exit 4 when the gate refuses), rollback, lineage.

python scripts/registry.py register PACKAGE_DIR --name NAME [--alias challenger] [--registry DIR]
python scripts/registry.py promote NAME --from challenger --to production [--data FILE]
"""

import sys

from deepship import cli


def main() -> None:
    sys.exit(cli.main(["registry", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
