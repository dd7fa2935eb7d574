"""popsync.textsafe: server text escaped, capped and stripped of the running secret."""

from __future__ import annotations

import threading

from popsync.errors import describe_exit
from popsync.pop3.sasl import credential_forms
from popsync.textsafe import (
    MAX_SERVER_TEXT,
    REDACTED,
    add_secrets,
    escape_controls,
    safe_text,
    scrub,
    scrub_scope,
    scrubbing,
)

__all__: list[str] = []


def test_terminal_sequences_are_escaped() -> None:
    """OSC title, screen clear, BEL, CR/LF, DEL and C1 controls become visible escapes."""
    text = "\x1b]0;title\x07\x1b[2J\r\nforged line\x7f\x9b"
    assert safe_text(text) == "\\x1b]0;title\\x07\\x1b[2J\\x0d\\x0aforged line\\x7f\\x9b"


def test_bidi_and_invisible_characters_are_escaped() -> None:
    """Right-to-left overrides and zero-width characters cannot disguise text."""
    assert safe_text("a\u202eb\u200bc\u2066d") == "a\\u202eb\\u200bc\\u2066d"


def test_printable_unicode_is_kept() -> None:
    """Ordinary non-ASCII text (accents, CJK) is shown as is."""
    assert safe_text("Mot de passe refusé: 密码") == "Mot de passe refusé: 密码"


def test_newlines_kept_only_on_request() -> None:
    """Tracebacks keep LF and TAB; everything else loses them."""
    assert escape_controls("a\n\tb\x1b", keep_newlines=True) == "a\n\tb\\x1b"
    assert escape_controls("a\n\tb") == "a\\x0a\\x09b"


def test_length_is_capped() -> None:
    """A flood of server text is cut and says how much was left out."""
    shown = safe_text("x" * 100_000)
    assert shown.startswith("x" * MAX_SERVER_TEXT + "... (")
    assert shown.endswith(f"({100_000 - MAX_SERVER_TEXT} more characters)")


def test_brief_and_tail_cuts() -> None:
    """A brief cut stays within the limit; a tail cut keeps the end; both scrub before cutting."""
    assert safe_text("abcdefghij", 8, cut="brief") == "abcde..."
    assert safe_text("abcdefghij", 4, cut="tail") == "...ghij"
    assert safe_text("short", 8, cut="tail") == "short"
    with scrubbing(["hunter2"]):
        # The cut falls inside the secret; it must be scrubbed whole first, not left in part.
        assert "hunt" not in safe_text("password: hunter2 was refused", 14, cut="brief")
        assert "er2" not in safe_text("x hunter2 was refused", 18, cut="tail")


def test_child_exit_is_described() -> None:
    """An exit status and a signal death read as they would in a shell's error line."""
    assert describe_exit(3) == "exited with status 3"
    assert describe_exit(-15) == "was killed by SIGTERM"
    assert describe_exit(-200) == "was killed by signal 200"


def test_bytes_are_decoded_safely() -> None:
    """Invalid UTF-8 is replaced, not raised."""
    assert safe_text(b"-ERR \xff\x1b") == "-ERR \ufffd\\x1b"


def test_every_form_of_the_secret_is_scrubbed() -> None:
    """The password and its PLAIN, XOAUTH2 and OAUTHBEARER base64 forms are all removed."""
    forms = credential_forms("bob", "hunter2", host="pop.example", port=995)
    echoed = (
        "-ERR hunter2 AGJvYgBodW50ZXIy "  # AUTH PLAIN's \0bob\0hunter2
        "aHVudGVyMg== "  # LOGIN's password step
        "dXNlcj1ib2IBYXV0aD1CZWFyZXIgaHVudGVyMgEB"  # XOAUTH2, without padding
    )
    with scrubbing(forms):
        shown = safe_text(echoed)
    assert "hunter2" not in shown
    assert shown == f"-ERR {REDACTED} {REDACTED} {REDACTED} {REDACTED}"


def test_scrubbing_is_per_thread_and_ends_with_the_scope() -> None:
    """Another thread does not see this run's secret, and nothing outlives the scope."""
    seen: list[str] = []

    @scrub_scope
    def run() -> None:
        add_secrets(["topsecret"])
        other = threading.Thread(target=lambda: seen.append(scrub("topsecret")))
        other.start()
        other.join()
        seen.append(scrub("topsecret"))

    run()
    assert seen == ["topsecret", REDACTED]
    assert scrub("topsecret") == "topsecret"
