"""``python -m popsync`` runs the command-line interface."""

from popsync.cli import run

run()
