"""``python -m citrus_ext.eval``: the ``citrus eval`` command on its own."""
import sys

from .cli import main

sys.exit(main())
