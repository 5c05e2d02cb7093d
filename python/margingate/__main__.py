"""``python -m margingate``: the same command line as the ``margingate`` console script."""

import sys

from .cli import main

sys.exit(main())
