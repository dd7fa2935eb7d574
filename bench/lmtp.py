"""Delivery bench: scenario a (2,000 x 4 KiB) fetched over POP3 and handed to Dovecot's LMTP.

One command (as root; needs dovecot-lmtpd, dovecot-sieve, fetchmail, mpop)::

    .venv/bin/python -m bench.lmtp [--runs 3] [--quick] [--only LABEL,...]

``--sessions 1,4,8`` picks the session counts of the ``popsync lmtp xN`` and ``load client
xN`` rows (default ``1,4``). ``--only`` keeps the rows whose label starts with one of the
given prefixes (``--only "popsync lmtp x4,fetchmail,load client x4"``); the default runs
every row. ``--baseline DIR`` adds the row ``popsync lmtp x4 (baseline)``: the popsync of
another checkout (``git worktree add DIR COMMIT``), run in the same loop, so a change is
measured before/after in one run.

Everything runs against one private POP3 Dovecot and one private LMTP Dovecot (with
``mail_fsync = optimized``, as a real server) in the same run, each tool into a fresh
recipient, so the figures compare like with like:

* ``popsync lmtp xN``: ``deliver = "lmtp"`` over the unix socket, ``lmtp_sessions = N``;
  with and without a Sieve script for the recipient;
* ``popsync maildir``: the plain Maildir target, for peak RSS;
* ``popsync mbox``: ``deliver = "mbox"`` into a fresh mbox file;
* ``fetchmail --lmtp``: fetchmail's LMTP delivery to the same socket;
* ``mpop dovecot-lda``: mpop ``delivery mda`` running dovecot-lda per message;
* ``mpop mbox``: mpop ``delivery mbox`` into a fresh mbox file;
* ``load client xN``: the floor: a pipelined LMTP client sending the messages from memory
  on N connections, no POP3 at all.

Each delivery is verified: the recipient's INBOX (or Lists), the Maildir or the mbox holds
every Message-ID exactly once. Peak RSS is GNU time's ``%M``, CPU its ``%U`` + ``%S`` (the
tool's own process and the children it waited for, not the servers); "machine busy" is
/proc/stat's busy time over the run, every process and the kernel's threads included (the
servers' work too), with its share of what the cores could have done in that wall time: a
share near 100% means the run was bound by the machine's CPU, not by waiting. "stolen" is
/proc/stat's steal time over the run: CPU time a virtual machine's hypervisor gave to other
guests; a run with seconds of it was slowed by a noisy neighbour, not by the tools. The
report is printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import mailbox
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from bench import mailgen
from devtools.dovecot import Dovecot, DovecotLmtp, MailUser

__all__ = ["main"]

REPO = Path(__file__).resolve().parents[1]
SIEVE = 'require ["fileinto"];\nif header :contains "subject" "zzz-never" { fileinto "Lists"; }\n'
_MSGID = re.compile(rb"(?im)^Message-ID:[ \t]*(<[^>\r\n]+>)")


def _message_ids(server: DovecotLmtp, user: MailUser) -> Counter[bytes]:
    found: Counter[bytes] = Counter()
    for folder in (None, "Lists"):
        for data in server.folder_messages(user, folder):
            m = _MSGID.search(data)
            found[m.group(1) if m else b"?"] += 1
    return found


def _mbox_ids(path: Path) -> Counter[bytes]:
    """Message-IDs of an mbox file, read back with the standard library."""
    found: Counter[bytes] = Counter()
    box = mailbox.mbox(path, create=False)
    try:
        for key in box.iterkeys():
            m = _MSGID.search(box.get_bytes(key))
            found[m.group(1) if m else b"?"] += 1
    finally:
        box.close()
    return found


def box_busy() -> tuple[float, float]:
    """(busy, stolen) CPU seconds of the whole machine since boot, from /proc/stat. Busy
    counts every core, every process and the kernel's own threads: a run's delta over the
    cores times its wall time says how close to saturated the machine was. Stolen is the
    time a hypervisor ran someone else while this machine had work: it slows every row."""
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...: idle and iowait are not busy.
    busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6]
    tick = os.sysconf("SC_CLK_TCK")
    return busy / tick, fields[7] / tick


def _since(before: tuple[float, float]) -> tuple[float, float]:
    now = box_busy()
    return now[0] - before[0], now[1] - before[1]


def _timed(argv: Sequence[str], cwd: Path | None = None) -> tuple[float, int, int, float]:
    """Run under GNU time (in ``cwd``): (wall seconds, exit code, peak RSS KiB, CPU seconds)."""
    with tempfile.NamedTemporaryFile("r") as out:
        started = time.monotonic()
        proc = subprocess.run(
            ["/usr/bin/time", "-o", out.name, "-f", "%M %U %S", *argv],
            cwd=cwd,
            capture_output=True,
            check=False,
        )
        wall = time.monotonic() - started
        fields = ((out.read().strip().splitlines() or [""])[-1].split() + ["0"] * 3)[:3]
    if proc.returncode not in (0, 1):
        sys.stderr.write(proc.stderr.decode(errors="replace")[-2000:])
    return wall, proc.returncode, int(fields[0]), float(fields[1]) + float(fields[2])


def _load_client(socket_path: Path, rcpt: str, messages: Sequence[bytes], sessions: int) -> float:
    """Deliver ``messages`` from memory on ``sessions`` pipelined LMTP connections."""

    def one(share: Sequence[bytes]) -> None:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(socket_path))
            file = sock.makefile("rb")

            def replies(count: int) -> None:
                for _ in range(count):
                    while True:
                        line = file.readline()
                        if line[3:4] != b"-":
                            if not line.startswith((b"2", b"3")):
                                raise RuntimeError(line)
                            break

            replies(1)
            sock.sendall(b"LHLO load\r\n")
            replies(1)
            for msg in share:
                body = re.sub(rb"(?m)^\.", b"..", msg)
                sock.sendall(b"MAIL FROM:<>\r\nRCPT TO:<%s>\r\nDATA\r\n" % rcpt.encode())
                replies(3)
                sock.sendall(body + b".\r\n")
                replies(1)
            sock.sendall(b"QUIT\r\n")

    shares = [messages[k::sessions] for k in range(sessions)]
    threads = [threading.Thread(target=one, args=(s,)) for s in shares]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.monotonic() - started


def _popsync_config(work: Path, dovecot: Dovecot, user: MailUser, target: str) -> Path:
    lines = [
        f'state_dir = "{work / "state"}"',
        "[accounts.bench]",
        f'host = "{dovecot.host}"',
        f"port = {dovecot.pop3_port}",
        'tls = "none"',
        "allow_plaintext = true",
        f'username = "{user.name}"',
        f'password = "{user.password}"',
        target,
    ]
    path = work / "popsync.toml"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.lmtp")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated label prefixes to run")
    parser.add_argument("--baseline", type=Path, help="another checkout's popsync, as a row")
    parser.add_argument(
        "--warm-config",
        action="store_true",
        help="run `popsync status` on each new config first (untimed), so the timed run reads"
        " it from the validated-config cache as every run after the first one does",
    )
    parser.add_argument(
        "--sessions",
        type=lambda text: sorted({int(n) for n in text.split(",")}),
        default=[1, 4],
        help="comma-separated LMTP session counts for the rows 'popsync lmtp xN' and"
        " 'load client xN' (default 1,4; the Sieve row is always x4)",
    )
    opts = parser.parse_args(argv)
    only = tuple(p.strip() for p in opts.only.split(",") if p.strip())

    def wanted(label: str) -> bool:
        return not only or label.startswith(only)

    box = mailgen.generate("a", quick=opts.quick)
    want = Counter(m.group(1) for m in (_MSGID.search(x) for x in box.messages) if m)
    root = Path(tempfile.mkdtemp(prefix="popsync-bench-lmtp-"))
    root.chmod(0o711)
    rows: dict[str, list[tuple[float, int, float, float, float]]] = {}
    problems: list[str] = []
    py = sys.executable
    try:
        with (
            Dovecot(root / "pop3") as pop3,
            DovecotLmtp(root / "lmtp", fsync=True) as lmtp,
        ):
            source = pop3.new_user("src")
            pop3.deliver_many(source, box.messages)
            lda = ["/usr/lib/dovecot/dovecot-lda", "-c", str(lmtp.config_file), "-d"]

            def popsync(
                label: str, target: str, sieve: bool = False
            ) -> Callable[[MailUser], list[str]]:
                def build(rcpt: MailUser) -> list[str]:
                    if sieve:
                        lmtp.set_sieve(rcpt, SIEVE)
                    work = root / "work" / label.replace(" ", "-")
                    shutil.rmtree(work, ignore_errors=True)
                    work.mkdir(parents=True)
                    text = target.format(rcpt=rcpt.name, sock=lmtp.socket_path, work=work)
                    cfg = _popsync_config(work, pop3, source, text)
                    return [py, "-m", "popsync", "--once", "-c", str(cfg)]

                return build

            def fetchmail(rcpt: MailUser) -> list[str]:
                work = root / "work" / "fetchmail"
                shutil.rmtree(work, ignore_errors=True)
                work.mkdir(parents=True)
                rc = work / "fetchmailrc"
                rc.write_text(
                    "set no syslog\n"
                    f"poll {pop3.host} service {pop3.pop3_port} protocol pop3 uidl auth password\n"
                    f'    user "{source.name}" there password "{source.password}"'
                    f' is "{rcpt.name}" here keep\n'
                    f"    sslproto '' lmtp smtphost \"{lmtp.socket_path}\""
                    f' smtpname "{rcpt.name}@example.org"\n'
                )
                rc.chmod(0o600)
                return [
                    "fetchmail", "--silent", "--nodetach", f"--fetchmailrc={rc}",
                    f"--idfile={work / 'ids'}", f"--pidfile={work / 'pid'}",
                ]  # fmt: skip

            def mpop(label: str, delivery: str) -> Callable[[MailUser], list[str]]:
                def build(rcpt: MailUser) -> list[str]:
                    work = root / "work" / label
                    shutil.rmtree(work, ignore_errors=True)
                    work.mkdir(parents=True)
                    rc = work / "mpoprc"
                    rc.write_text(
                        "defaults\ntls off\nauth user\nkeep on\naccount bench\n"
                        f"host {pop3.host}\nport {pop3.pop3_port}\n"
                        f"user {source.name}\npassword {source.password}\n"
                        f"delivery {delivery.format(rcpt=rcpt.name, work=work)}\n"
                        f"uidls_file {work / 'uidls'}\n"
                    )
                    rc.chmod(0o600)
                    return ["mpop", f"--file={rc}", "--quiet", "bench"]

                return build

            lmtp_target = (
                'deliver = "lmtp"\nlmtp = "unix:{sock}"\n'
                'lmtp_recipient = "{rcpt}@example.org"\nlmtp_sessions = %d'
            )
            tools: dict[str, Callable[[MailUser], list[str]]] = {
                **{
                    f"popsync lmtp x{n}": popsync(f"popsync lmtp x{n}", lmtp_target % n)
                    for n in opts.sessions
                },
                "popsync lmtp x4 + sieve": popsync("p4s", lmtp_target % 4, sieve=True),
                "popsync mda dovecot-lda": popsync(
                    "pmda", f'deliver = "mda"\nmda = {[*lda, "{rcpt}"]!r}'.replace("'", '"')
                ),
                "popsync maildir": popsync("pmd", 'maildir = "{work}/Maildir"'),
                "popsync mbox": popsync("pmb", 'deliver = "mbox"\nmbox = "{work}/inbox.mbox"'),
                "fetchmail --lmtp": fetchmail,
                "mpop mda dovecot-lda": mpop("mpop", f"mda {' '.join(lda)} {{rcpt}}"),
                "mpop mbox": mpop("mpop-mbox", "mbox {work}/inbox.mbox"),
            }
            if opts.baseline is not None:
                base = "popsync lmtp x4 (baseline)"
                tools = {base: popsync("baseline", lmtp_target % 4), **tools}
            tools = {label: build for label, build in tools.items() if wanted(label)}
            for run in range(opts.runs):
                for label, build in tools.items():
                    rcpt = lmtp.new_user("b")
                    argv_ = build(rcpt)
                    in_baseline = label.endswith("(baseline)")
                    if opts.warm_config and argv_[1:3] == ["-m", "popsync"]:
                        # Each run has a new recipient, so a new config: without this, every
                        # timed run would validate it (pydantic), as only a first run does.
                        status = [*argv_[:3], "status", *argv_[-2:]]
                        _timed(status, opts.baseline if in_baseline else None)
                    before = box_busy()
                    wall, code, rss, cpu = _timed(argv_, opts.baseline if in_baseline else None)
                    busy, stolen = _since(before)
                    if label.endswith("mbox"):
                        work = "pmb" if label.startswith("popsync") else "mpop-mbox"
                        got = _mbox_ids(root / "work" / work / "inbox.mbox")
                    elif label == "popsync maildir":
                        maildir = root / "work" / "pmd" / "Maildir" / "new"
                        got = Counter(
                            m.group(1)
                            for m in (_MSGID.search(p.read_bytes()) for p in maildir.iterdir())
                            if m
                        )
                    else:
                        got = _message_ids(lmtp, rcpt)
                    ok = got == want and code in (0, 1)
                    if not ok:
                        problems.append(f"{label} run {run}: exit {code}, {sum(got.values())} msgs")
                    rows.setdefault(label, []).append((wall, rss, cpu, busy, stolen))
                    print(f"[{run + 1}/{opts.runs}] {label}: {wall:.2f} s, {rss} KiB, "
                          f"{cpu:.2f} s CPU, machine {busy:.2f} CPU-s, stolen {stolen:.2f}, "
                          f"{'OK' if ok else 'FAILED'}", flush=True)  # fmt: skip
                for sessions in opts.sessions:
                    if not wanted(f"load client x{sessions}"):
                        continue
                    rcpt = lmtp.new_user("l")
                    before = box_busy()
                    wall = _load_client(
                        lmtp.socket_path, f"{rcpt.name}@example.org", box.messages, sessions
                    )
                    ok = _message_ids(lmtp, rcpt) == want
                    label = f"load client x{sessions}"
                    if not ok:
                        problems.append(f"{label} run {run}")
                    busy, stolen = _since(before)
                    rows.setdefault(label, []).append((wall, 0, 0.0, busy, stolen))
                    print(f"[{run + 1}/{opts.runs}] {label}: {wall:.2f} s, "
                          f"machine {busy:.2f} CPU-s, stolen {stolen:.2f}", flush=True)  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print()
    print(f"scenario a: {len(box.messages)} messages, {box.total_bytes / 2**20:.1f} MiB")
    cores = os.cpu_count() or 1
    print(
        "| tool | median wall (s) | min-max (s) | peak RSS (MiB) | median CPU (s) |"
        f" machine busy, median (CPU-s, share of {cores} cores x wall) |"
        " stolen, median-max (CPU-s) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, values in rows.items():
        walls = sorted(v[0] for v in values)
        cpus = sorted(v[2] for v in values)
        used, share = sorted((v[3], v[3] / (cores * v[0])) for v in values)[len(values) // 2]
        steals = sorted(v[4] for v in values)
        peak = max(v[1] for v in values) / 1024
        median = walls[len(walls) // 2]
        rss_cell = f"{peak:.1f}" if peak else "-"
        cpu_cell = f"{cpus[len(cpus) // 2]:.2f}" if peak else "-"
        print(
            f"| {label} | {median:.2f} | {walls[0]:.2f}-{walls[-1]:.2f} | {rss_cell} | {cpu_cell} |"
            f" {used:.2f} ({share:.0%}) | {steals[len(steals) // 2]:.2f}-{steals[-1]:.2f} |"
        )
    for problem in problems:
        print("FAILED:", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
