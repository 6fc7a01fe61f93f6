"""``python -m d2z_optim``: the ``d2z`` command line."""

import sys

from .cli import main

sys.exit(main())
