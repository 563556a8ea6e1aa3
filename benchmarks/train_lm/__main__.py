"""``python -m benchmarks.train_lm``: the benchmark's command line (``benchmarks.train_lm.main``)."""
import sys

from . import main

sys.exit(main())
