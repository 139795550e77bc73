"""``python -m benchmarks.abuse [--only NAME ...] [--seconds S] ...``: see the package's docstring."""

import sys

from .cli import main

sys.exit(main())
