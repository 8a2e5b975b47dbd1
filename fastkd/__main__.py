"""``python -m fastkd``: the command-line interface (see :mod:`fastkd.cli`)."""

import sys

from fastkd.cli import main

sys.exit(main())
