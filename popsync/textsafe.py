"""Make server-controlled text safe to show: no terminal control, bounded, no secret.

A POP3 server chooses the text of its greeting, its ``-ERR`` replies and its SASL
challenges. Printed raw, that text can drive a terminal (``ESC ]0;title BEL``, ``ESC [2J``),
forge log lines (CR, LF), reorder what a reader sees (bidi overrides), or flood a log. And a
server may echo what it was sent, the password included. Everything server-controlled passes
through :func:`safe_text` before it reaches a terminal, a log line or ``popsync status``.

Secrets are scrubbed by value: a run registers the forms in which it sends its account's
secret (:func:`add_secrets` inside a :func:`scrub_scope`; a context variable, so each worker
thread scrubs only its own account's secret and nothing outlives the run), and :func:`scrub`
replaces them. The logging
setup applies :func:`scrub` and :func:`escape_controls` to every event as a last line of
defence.
"""

from __future__ import annotations

import contextvars
import functools
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Literal, ParamSpec, TypeAlias, TypeVar

__all__ = [
    "MAX_SERVER_TEXT",
    "REDACTED",
    "add_secrets",
    "escape_controls",
    "safe_text",
    "scrub",
    "scrub_scope",
    "scrubbing",
]

#: Characters of server text kept in a message; a reply line is at most 512 octets anyway.
MAX_SERVER_TEXT = 600

REDACTED = "[redacted]"

# C0 and C1 controls, DEL, and the invisible format characters that reorder or hide text
# (bidi embeddings/overrides/isolates, zero-width characters, line/paragraph separators).
_CONTROLS = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ufff9-\ufffb]"
)
_CONTROLS_KEEP_LINES = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ufff9-\ufffb]"
)

P = ParamSpec("P")
R = TypeVar("R")

_secrets: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "popsync_secrets", default=()
)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str, *, keep_newlines: bool = False) -> str:
    """Replace control and invisible format characters by ``\\xNN``/``\\uNNNN`` escapes.

    ``keep_newlines`` leaves LF and TAB alone (for tracebacks popsync formats itself).
    """
    pattern = _CONTROLS_KEEP_LINES if keep_newlines else _CONTROLS
    return pattern.sub(_escape, text)


def scrub(text: str) -> str:
    """Replace every secret form registered by :func:`scrubbing` with ``[redacted]``."""
    for form in _secrets.get():
        if form in text:
            text = text.replace(form, REDACTED)
    return text


Cut: TypeAlias = Literal["note", "brief", "tail"]


def safe_text(text: str | bytes, limit: int = MAX_SERVER_TEXT, *, cut: Cut = "note") -> str:
    """Server text made fit to print: secrets scrubbed, controls escaped, at most ``limit``.

    Bytes are decoded as UTF-8 with invalid octets replaced. Scrubbing comes first, so an
    escape or the cut cannot split a secret into pieces that no longer match. A longer text
    is cut: ``"note"`` keeps the start and says how much is missing (logs), ``"brief"``
    keeps the start and ends in ``...`` within ``limit`` (one-line reports), ``"tail"``
    keeps the end (where a command says what went wrong).
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = escape_controls(scrub(text))
    if len(text) <= limit:
        return text
    if cut == "brief":
        return text[: max(0, limit - 3)] + "..."
    if cut == "tail":
        return "..." + text[-limit:]
    return text[:limit] + f"... ({len(text) - limit} more characters)"


def add_secrets(forms: Iterable[str]) -> None:
    """From now until the enclosing :func:`scrubbing` block ends, also scrub ``forms``.

    Longer forms are replaced first, so a secret inside its own base64 wrapping, or a
    password that contains another, leaves nothing behind. Empty forms are ignored.
    Call it only inside :func:`scrubbing` or :func:`scrub_scope`, or the forms stay
    registered for the rest of the thread.
    """
    known = set(_secrets.get())
    known.update(form for form in forms if form)
    _secrets.set(tuple(sorted(known, key=len, reverse=True)))


@contextmanager
def scrubbing(forms: Iterable[str] = ()) -> Iterator[None]:
    """Within the block, :func:`scrub` also removes ``forms`` (the current thread only)."""
    token = _secrets.set(_secrets.get())
    try:
        add_secrets(forms)
        yield
    finally:
        _secrets.reset(token)


def scrub_scope(func: Callable[P, R]) -> Callable[P, R]:
    """Decorator: secrets that ``func`` registers with :func:`add_secrets` end with it."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with scrubbing():
            return func(*args, **kwargs)

    return wrapper
