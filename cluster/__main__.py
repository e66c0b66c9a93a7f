"""`python -m cluster` == `fleetlm` (imports the CLI once, so its error type is the one raised)."""

import sys

from cluster.cli import main

sys.exit(main())
