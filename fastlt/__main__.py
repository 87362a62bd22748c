"""``python -m fastlt``: the ``fastlt`` command (see :mod:`fastlt.cli`)."""

import sys

from .cli import main

sys.exit(main())
