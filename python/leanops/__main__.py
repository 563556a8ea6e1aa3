"""``python -m leanops``: the ``leanops`` command line (leanops.cli.main, the console script's entry point)."""
import sys

from leanops.cli import main

if __name__ == "__main__":
    sys.exit(main())
