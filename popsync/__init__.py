"""popsync: a POP3-to-Maildir sync daemon that delivers every message exactly once.

The POP3 client is usable on its own: :mod:`popsync.poplib` is a drop-in for the
standard library's :mod:`poplib`, and :mod:`popsync.client` is the native client built
on the sans-I/O core :mod:`popsync.pop3`.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
