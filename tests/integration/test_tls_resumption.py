"""TLS sessions against the real Dovecot: one shared context per settings, sessions resumed."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme

from devtools.dovecot import Dovecot, MailUser
from popsync import net
from popsync.errors import CertificateError
from popsync.session import open_session, tls_context
from tests.synchelp import dovecot_account

__all__: list[str] = []


@pytest.fixture(autouse=True)
def _fresh_caches() -> None:
    """Each test starts without shared contexts or saved sessions."""
    net._contexts.clear()
    net._sessions.clear()


def _greet(context: net.SSLContext, dovecot: Dovecot) -> net.Stream:
    stream = net.connect(dovecot.host, dovecot.pop3s_port, timeout=10, context=context)
    assert stream.recv(512).startswith(b"+OK")  # the TLS 1.3 ticket arrives with it
    return stream


def test_a_second_connection_resumes_the_session(dovecot: Dovecot) -> None:
    """The second and later handshakes with the same shared context are resumptions."""
    context = net.shared_client_context([dovecot.ca_file])
    reused = []
    for _ in range(3):
        stream = _greet(context, dovecot)
        reused.append(stream.session_reused)
        assert stream.peer_certificate()  # the certificate is known on a resumed session too
        stream.close()
    assert reused == [False, True, True]


def test_sessions_are_not_shared_across_trust_settings(dovecot: Dovecot, tmp_path: Path) -> None:
    """A session verified under one CA does not let a context with another CA skip its check."""
    good = net.shared_client_context([dovecot.ca_file])
    _greet(good, dovecot).close()
    wrong = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(wrong))
    other = net.shared_client_context([wrong])
    assert other is not good
    with pytest.raises(CertificateError):
        _greet(other, dovecot)


def test_the_shared_context_follows_the_ca_file(dovecot: Dovecot, tmp_path: Path) -> None:
    """The same settings give the same context until the CA file is replaced."""
    ca = tmp_path / "ca.pem"
    ca.write_bytes(dovecot.ca_file.read_bytes())
    first = net.shared_client_context([ca])
    assert net.shared_client_context([ca]) is first
    assert net.shared_client_context([ca], verify=False) is not first
    ca.write_bytes(dovecot.ca_file.read_bytes() + b"\n")  # replaced: another size
    assert net.shared_client_context([ca]) is not first


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
def test_logins_resume_the_session(
    dovecot: Dovecot, mail_user: MailUser, tmp_path: Path, tls: str
) -> None:
    """open_session (what every run uses) resumes TLS from the second login on, both TLS modes."""
    port = dovecot.pop3s_port if tls == "implicit" else dovecot.pop3_port
    _, account = dovecot_account(
        dovecot, mail_user, tmp_path / "Maildir", tmp_path / "state", tls=tls, port=port
    )
    assert tls_context(account) is tls_context(account)
    reused = []
    for _ in range(2):
        client = open_session(account, mail_user.password)
        try:
            client.stat()
            reused.append(client._stream is not None and client._stream.session_reused)
        finally:
            client.quit()
    assert reused == [False, True]


def test_a_resumed_session_is_saved_again_only_when_old(
    dovecot: Dovecot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading the session back costs CPU: a resumed one is re-saved after SESSION_REFRESH only."""
    context = net.shared_client_context([dovecot.ca_file])
    key = (dovecot.host, dovecot.pop3s_port, dovecot.host)
    _greet(context, dovecot).close()
    first = net._sessions[context][key]
    stream = _greet(context, dovecot)
    assert stream.session_reused
    stream.close()
    assert net._sessions[context][key] == first  # young: kept as it was
    monkeypatch.setattr(net, "SESSION_REFRESH", 0.0)
    stream = _greet(context, dovecot)
    assert stream.session_reused
    stream.close()
    assert net._sessions[context][key][1] > first[1]  # old: replaced by the fresh ticket
