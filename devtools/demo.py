"""The README's first command: sync a throwaway local Dovecot into a local Maildir.

``./dev demo`` runs this. It starts a private Dovecot on free loopback ports (STLS with a
test CA), seeds a mailbox with sample mail, writes ``demo/config.toml``, runs
``popsync --once`` twice (the second run finds nothing new), shows ``popsync status`` and
the delivered messages, and stops Dovecot. Everything stays under ``demo/`` to look at.
"""

from __future__ import annotations

import email
import email.policy
import shutil
import subprocess
import sys
from pathlib import Path

from devtools.dovecot import Dovecot, MailUser

__all__ = ["main", "sample_messages"]

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo"


def sample_messages(count: int = 25) -> list[bytes]:
    """A small, varied mailbox: plain, UTF-8, long lines, dot lines, an attachment."""
    out: list[bytes] = []
    for i in range(1, count + 1):
        subject = f"Demo message {i}"
        body = f"Hello, this is message {i} of {count}.\r\n"
        if i % 5 == 0:
            subject = f"=?utf-8?q?Gr=C3=BC=C3=9Fe_{i}?="
            body += "Non-ASCII body: Grüße, 東京, emoji 📬.\r\n"
        if i % 7 == 0:
            body += "." * 3 + " a line starting with dots\r\n.\r\n..\r\n"
        if i % 11 == 0:
            body += "long line: " + "x" * 5000 + "\r\n"
        out.append(
            (
                f"From: Demo Sender <sender@example.org>\r\n"
                f"To: demo@example.org\r\n"
                f"Subject: {subject}\r\n"
                f"Message-ID: <demo-{i}@example.org>\r\n"
                f"Date: Fri, 27 Nov 2026 12:{i % 60:02d}:00 +0000\r\n"
                f"MIME-Version: 1.0\r\n"
                f"Content-Type: text/plain; charset=utf-8\r\n"
                f"Content-Transfer-Encoding: 8bit\r\n\r\n{body}"
            ).encode()
        )
    return out


def _config(server: Dovecot, user: MailUser) -> str:
    return f"""\
# Written by ./dev demo: one account on a throwaway local Dovecot.
state_dir = "{DEMO / "state"}"

[accounts.demo]
host = "127.0.0.1"
port = {server.pop3_port}
tls = "starttls"
tls_ca_file = "{server.ca_file}"
username = "{user.name}"
password_file = "{DEMO / "password"}"
maildir = "{DEMO / "Maildir"}"
delete = "never"
"""


def _popsync(*args: str) -> int:
    command = [sys.executable, "-m", "popsync", *args]
    print(f"\n$ popsync {' '.join(args)}", flush=True)
    return subprocess.run(command, check=False).returncode


def _show_maildir(maildir: Path) -> None:
    files = sorted((maildir / "new").iterdir())
    print(f"\n{len(files)} message(s) in {maildir}/new:")
    for path in files[:10]:
        message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        print(f"  {message['subject']!s:<20} {path.name}")
    if len(files) > 10:
        print(f"  ... and {len(files) - 10} more")


def main() -> int:
    if DEMO.exists():
        shutil.rmtree(DEMO)
    DEMO.mkdir()
    with Dovecot(DEMO / "dovecot") as server:
        user = server.new_user("demo")
        server.deliver_many(user, sample_messages())
        print(f"Dovecot on 127.0.0.1:{server.pop3_port} (STLS), user {user.name}, 25 messages")
        password = DEMO / "password"
        password.write_text(user.password + "\n")
        password.chmod(0o600)
        config = DEMO / "config.toml"
        config.write_text(_config(server, user))
        codes = [
            _popsync("--once", "-c", str(config)),
            _popsync("--once", "-c", str(config)),
            _popsync("status", "-c", str(config)),
        ]
        _show_maildir(DEMO / "Maildir")
    print(f"\nConfig, state and Maildir are in {DEMO}/ (Dovecot has been stopped).")
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
