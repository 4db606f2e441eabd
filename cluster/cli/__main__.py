"""`python -m cluster.cli`: the same as the `migbed` script."""

import sys

from cluster.cli import main

sys.exit(main())
