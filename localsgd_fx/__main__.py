"""``python -m localsgd_fx ...`` is the ``localsgd`` command (see :mod:`localsgd_fx.cli`)."""
import sys

from .cli import main

sys.exit(main())
