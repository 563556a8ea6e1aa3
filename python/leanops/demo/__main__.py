"""``python -m leanops.demo``: the demos' command line (``leanops.demo.main``), also the CPU memory pass's process."""
import sys

from . import main

sys.exit(main())
