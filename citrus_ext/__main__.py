"""``python -m citrus_ext``: the ``citrus`` command (see :mod:`citrus_ext.cli`)."""
import sys

from .cli import main

sys.exit(main())
