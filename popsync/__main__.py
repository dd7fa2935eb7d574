"""``python -m popsync`` runs the command-line interface."""

import sys

from popsync.cli import main

sys.exit(main())
