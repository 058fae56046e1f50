"""``python -m clora``: the ``clora`` command (clora.cli.main)."""

import sys

from clora.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
