"""The one table of POP3 session states (RFC 1939 section 3, RFC 2449, RFC 5034, RFC 6856).

Which commands a state allows, and where a ``+OK`` to each command leads. A ``-ERR``
changes the state only for QUIT in TRANSACTION. Everything else in the core asks this table.
"""

from __future__ import annotations

import enum

__all__ = ["ALLOWED", "State", "next_state", "next_state_after_err"]


class State(enum.Enum):
    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"
    UPDATE = "UPDATE"
    CLOSED = "CLOSED"


ALLOWED: dict[State, frozenset[bytes]] = {
    State.AUTHORIZATION: frozenset(
        {b"USER", b"PASS", b"APOP", b"RPOP", b"AUTH", b"CAPA", b"STLS", b"UTF8", b"QUIT"}
    ),
    State.TRANSACTION: frozenset(
        {b"STAT", b"LIST", b"RETR", b"DELE", b"NOOP", b"RSET", b"TOP", b"UIDL", b"CAPA", b"QUIT"}
    ),
    State.UPDATE: frozenset(),
    State.CLOSED: frozenset(),
}

_ON_OK: dict[tuple[State, bytes], State] = {
    (State.AUTHORIZATION, b"PASS"): State.TRANSACTION,
    (State.AUTHORIZATION, b"APOP"): State.TRANSACTION,
    (State.AUTHORIZATION, b"RPOP"): State.TRANSACTION,
    (State.AUTHORIZATION, b"AUTH"): State.TRANSACTION,
    (State.AUTHORIZATION, b"QUIT"): State.CLOSED,
    # The server commits DELEs when it answers QUIT, then closes (UPDATE state).
    (State.TRANSACTION, b"QUIT"): State.UPDATE,
}


# RFC 1939 section 6: after QUIT the server enters UPDATE and closes the connection
# even when it answers "-ERR some deleted messages not removed".
_ON_ERR: dict[tuple[State, bytes], State] = {
    (State.TRANSACTION, b"QUIT"): State.UPDATE,
}


def next_state(state: State, verb: bytes) -> State:
    """Where a ``+OK`` to ``verb`` in ``state`` leads."""
    return _ON_OK.get((state, verb), state)


def next_state_after_err(state: State, verb: bytes) -> State:
    """Where a ``-ERR`` to ``verb`` in ``state`` leads."""
    return _ON_ERR.get((state, verb), state)
