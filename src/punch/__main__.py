"""``python -m punch`` is the ``punch`` command."""

import sys

from ._cli import main

sys.exit(main())
