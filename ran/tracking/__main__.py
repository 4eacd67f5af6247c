"""``python -m ran.tracking MODEL --to DIR``: download a registered model, check that it is ran's
own and print its directory (``make serve``); see :mod:`ran.tracking.provenance`."""

import sys

from ran.tracking.provenance import main

sys.exit(main())
