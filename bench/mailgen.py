"""Deterministic mailboxes for the benchmark scenarios (issue 5).

Every message is a realistic RFC 5322 message with CRLF line ends (what POP3 RETR sends and what
the private Dovecot stores), lines well under 998 octets (stdlib ``poplib`` refuses lines over
2048) and a unique ``Message-ID: <bench-...@popsync.bench>`` by which verification finds it.
Some bodies hold lines that start with "." so dot-stuffing is exercised.

The same seed always gives the same bytes, so runs on different machines fetch the same mail.
"""

from __future__ import annotations

import base64
import random
from dataclasses import dataclass, field

__all__ = [
    "KIB",
    "MIB",
    "SCENARIOS",
    "Mailbox",
    "ScaleSet",
    "generate",
    "generate_scale",
    "make_message",
]

KIB = 1024
MIB = 1024 * 1024
SCENARIOS = ("a", "b", "c", "lat", "scale", "fleet")

_PROSE = (
    "the of and to in is was for on that with as by at from this be are have it an or not which "
    "mail server message delivery maildir queue batch commit network latency pipeline header body "
    "account report meeting invoice schedule project update review draft release budget quarter "
    "customer support ticket attached please find below regards thanks tomorrow morning agenda"
)
_WORDS = tuple(_PROSE.split())
_NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy")


@dataclass(frozen=True)
class Mailbox:
    """One server mailbox: its scenario name and its messages in delivery order."""

    name: str
    messages: tuple[bytes, ...]
    total_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "total_bytes", sum(len(m) for m in self.messages))


@dataclass(frozen=True)
class ScaleSet:
    """Scenario "scale": per account, the mail present at start and the mail added later."""

    initial: tuple[Mailbox, ...]
    new: tuple[Mailbox, ...]


def _line_pool(seed: str) -> tuple[bytes, ...]:
    """Return 4096 prose lines; messages pick from them, which is ~50x faster than word by word."""
    rnd = random.Random(f"pool:{seed}")
    pool: list[bytes] = []
    for _ in range(4096):
        words: list[str] = []
        width = rnd.randint(40, 76)
        while sum(len(w) + 1 for w in words) < width:
            words.append(rnd.choice(_WORDS))
        line = " ".join(words)
        if rnd.random() < 0.03:
            line = "." + line  # must be dot-stuffed on the wire
        pool.append(line.encode("ascii"))
    return tuple(pool)


_POOL = _line_pool("5")


def _text_lines(rnd: random.Random, nbytes: int) -> list[bytes]:
    """Return prose lines (without line ends) whose CRLF-joined size is at least ``nbytes``."""
    lines: list[bytes] = []
    size = 0
    pick = rnd.getrandbits
    while size < nbytes:
        line = _POOL[pick(12)]
        lines.append(line)
        size += len(line) + 2
    return lines


def _headers(rnd: random.Random, box: str, index: int, content_type: str) -> list[bytes]:
    sender = rnd.choice(_NAMES)
    rcpt = rnd.choice(_NAMES)
    day = 1 + index % 28
    hour, minute, sec = rnd.randrange(24), rnd.randrange(60), rnd.randrange(60)
    date = f"{day:02d} Mar 2025 {hour:02d}:{minute:02d}:{sec:02d} +0000"
    subject = " ".join(rnd.choice(_WORDS) for _ in range(rnd.randint(3, 8)))
    return [
        b"Received: from mx.example.org (mx.example.org [192.0.2.25])",
        f"\tby mail.popsync.bench with ESMTPS id {rnd.getrandbits(48):012x}".encode(),
        f"\tfor <{rcpt}@popsync.bench>; {date}".encode(),
        f"From: {sender.title()} <{sender}@example.org>".encode(),
        f"To: {rcpt.title()} <{rcpt}@popsync.bench>".encode(),
        f"Subject: [{box}] {subject}".encode(),
        f"Date: {date}".encode(),
        f"Message-ID: <bench-{box}-{index:06d}@popsync.bench>".encode(),
        b"MIME-Version: 1.0",
        f"Content-Type: {content_type}".encode(),
    ]


def _fit(head: list[bytes], body: list[bytes], size: int) -> bytes:
    """Join with CRLF and trim/pad the last text line so the message is exactly ``size`` bytes."""
    msg = b"\r\n".join([*head, b"", *body]) + b"\r\n"
    if len(msg) > size:
        # drop whole trailing lines, then pad the last one back up
        while body and len(msg) > size:
            body.pop()
            msg = b"\r\n".join([*head, b"", *body]) + b"\r\n"
    missing = size - len(msg)
    if missing > 0:
        pad = b"x" * max(missing - 2, 0)
        body.append(pad)
        msg = b"\r\n".join([*head, b"", *body]) + b"\r\n"
        if len(msg) != size:  # a 1-byte gap cannot hold a CRLF line: widen the previous line
            body.pop()
            body[-1] += b"x" * (size - (len(msg) - len(pad) - 2))
            msg = b"\r\n".join([*head, b"", *body]) + b"\r\n"
    return msg


def _text_message(rnd: random.Random, box: str, index: int, size: int) -> bytes:
    head = [
        *_headers(rnd, box, index, "text/plain; charset=us-ascii"),
        b"Content-Transfer-Encoding: 7bit",
    ]
    return _fit(head, _text_lines(rnd, size), size)


def _attachment_message(rnd: random.Random, box: str, index: int, size: int) -> bytes:
    boundary = f"=_bench_{rnd.getrandbits(64):016x}"
    head = _headers(rnd, box, index, f'multipart/mixed; boundary="{boundary}"')
    text = _text_lines(rnd, rnd.randint(300, 1500))
    # base64 of incompressible bytes: 76-char lines, ~4/3 overhead (78 bytes per 57 raw)
    raw_len = max((size - 2000) * 57 // 78, 1)
    encoded = base64.b64encode(rnd.randbytes(raw_len))
    b64 = [encoded[i : i + 76] for i in range(0, len(encoded), 76)]
    body = [
        b"This is a multi-part message in MIME format.",
        b"",
        f"--{boundary}".encode(),
        b"Content-Type: text/plain; charset=us-ascii",
        b"Content-Transfer-Encoding: 7bit",
        b"",
        *text,
        b"",
        f"--{boundary}".encode(),
        f'Content-Type: application/octet-stream; name="file{index}.bin"'.encode(),
        b"Content-Transfer-Encoding: base64",
        f'Content-Disposition: attachment; filename="file{index}.bin"'.encode(),
        b"",
        *b64,
        b"",
        f"--{boundary}--".encode(),
    ]
    return b"\r\n".join([*head, b"", *body]) + b"\r\n"


def make_message(rnd: random.Random, box: str, index: int, size: int, attachment: bool) -> bytes:
    """Return one message of about ``size`` bytes (exactly ``size`` for plain text ones)."""
    if attachment:
        return _attachment_message(rnd, box, index, size)
    return _text_message(rnd, box, index, size)


def _fixed(box: str, count: int, size: int, seed: int) -> Mailbox:
    rnd = random.Random(f"{seed}:{box}")
    return Mailbox(box, tuple(_text_message(rnd, box, i, size) for i in range(count)))


def _large_sizes(rnd: random.Random, count: int, target: int) -> list[int]:
    """Draw ``count`` sizes in 5-20 MiB, then stretch them (clamped) towards ``target`` total."""
    lo, hi = 5 * MIB, 20 * MIB
    sizes = [rnd.randint(lo, hi) for _ in range(count)]
    for _ in range(50):
        total = sum(sizes)
        if count == 0 or abs(total - target) < MIB:
            break
        factor = target / total
        sizes = [min(hi, max(lo, int(s * factor))) for s in sizes]
    return sizes


def _mixed(box: str, seed: int, *, quick: bool) -> Mailbox:
    """Scenario b: ~88% 2-20 KiB text, ~10% 100-300 KiB attachments, ~1.5% 5-20 MiB (~291 MB)."""
    rnd = random.Random(f"{seed}:{box}")
    if quick:
        kinds = ["text"] * 16 + ["medium"] * 3 + ["large"]
        large = [1 * MIB]
    else:
        kinds = ["text"] * 968 + ["medium"] * 115 + ["large"] * 17
        # 291 MB minus the expected text (968 x 11 KiB) and medium (115 x 200 KiB) share
        large = _large_sizes(rnd, 17, 291_800_000 - 968 * 11 * KIB - 115 * 200 * KIB)
    rnd.shuffle(kinds)
    messages: list[bytes] = []
    big = iter(large)
    for i, kind in enumerate(kinds):
        if kind == "text":
            messages.append(_text_message(rnd, box, i, rnd.randint(2 * KIB, 20 * KIB)))
        elif kind == "medium":
            messages.append(_attachment_message(rnd, box, i, rnd.randint(100 * KIB, 300 * KIB)))
        else:
            messages.append(_attachment_message(rnd, box, i, next(big)))
    return Mailbox(box, tuple(messages))


def generate(name: str, *, quick: bool = False, seed: int = 5) -> Mailbox:
    """Return the mailbox for scenario ``name`` ("a", "b", "c" or "lat"); ``quick`` shrinks it."""
    if name == "a":
        return _fixed("a", 20 if quick else 2000, 4 * KIB, seed)
    if name == "b":
        return _mixed("b", seed, quick=quick)
    if name == "c":
        return _fixed("c", 50 if quick else 10_000, 4 * KIB, seed)
    if name == "lat":
        return _fixed("lat", 20 if quick else 500, 4 * KIB, seed)
    raise ValueError(f"no single mailbox for scenario {name!r}")


def generate_scale(
    accounts: int = 200, initial: int = 10, new: int = 2, *, seed: int = 5
) -> ScaleSet:
    """Scenario scale: ``accounts`` mailboxes of ``initial`` 4 KiB messages, ``new`` more later."""
    first: list[Mailbox] = []
    later: list[Mailbox] = []
    for k in range(accounts):
        rnd = random.Random(f"{seed}:scale:{k}")
        box = f"s{k:03d}"
        msgs = [_text_message(rnd, box, i, 4 * KIB) for i in range(initial + new)]
        first.append(Mailbox(box, tuple(msgs[:initial])))
        later.append(Mailbox(box, tuple(msgs[initial:])))
    return ScaleSet(tuple(first), tuple(later))
