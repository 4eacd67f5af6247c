"""``python -m ran``: the same as the ``ran`` command."""

import sys

from ran.cli import main

sys.exit(main())
