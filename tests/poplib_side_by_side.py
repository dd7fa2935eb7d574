"""Run the same calls through popsync.poplib and stdlib poplib and record each outcome.

An outcome is ``("ok", value)`` or ``(kind, exc.args)`` where kind is ``"error_proto"``
for the module's own error class (so popsync's typed subclasses compare equal to
poplib's plain one when their args match) and the exception class name otherwise.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

__all__ = ["Call", "Outcome", "outcome", "run_calls"]

Call = tuple[str, Callable[[Any], object]]
Outcome = tuple[str, str, object]


def outcome(module: ModuleType, name: str, call: Callable[[], object]) -> Outcome:
    """What ``call()`` returned or raised, labelled with ``name``."""
    try:
        return (name, "ok", call())
    except module.error_proto as exc:
        return (name, "error_proto", exc.args)
    except Exception as exc:
        return (name, type(exc).__name__, exc.args)


def run_calls(module: ModuleType, conn: object, calls: Sequence[Call]) -> list[Outcome]:
    """Apply each call to ``conn`` in order; every outcome, errors included."""
    return [outcome(module, name, functools.partial(fn, conn)) for name, fn in calls]
