"""SASL encoders and the APOP digest, checked against the RFCs' own test vectors."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popsync.pop3 import LocalProtocolError, RemoteProtocolError, sasl

__all__: list[str] = []

# RFC 7677 section 3.
SCRAM_NONCE = "rOprNGfwEbeRWgbNEkqO"
SCRAM_SERVER_FIRST = (
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
SCRAM_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
SCRAM_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def scram_after_first() -> sasl.ScramSha256:
    """A SCRAM exchange from RFC 7677 that has answered the server-first message."""
    mech = sasl.ScramSha256("user", "pencil", nonce=SCRAM_NONCE)
    assert mech.initial() == b"n,,n=user,r=" + SCRAM_NONCE.encode()
    assert mech.step(SCRAM_SERVER_FIRST) == SCRAM_CLIENT_FINAL
    return mech


def test_apop_digest_rfc1939_example() -> None:
    """RFC 1939 section 7: the digest for <1896.697170952@dbc.mtview.ca.us> and tanstaaf."""
    digest = sasl.apop_digest(b"<1896.697170952@dbc.mtview.ca.us>", "tanstaaf")
    assert digest == b"c4c9334bac560ecc979e58001b3e22fb"


def test_plain_message_and_empty_challenge() -> None:
    """PLAIN is authzid NUL user NUL password, sent again if the server asks with '+'."""
    mech = sasl.Plain("tim", "tanstaaf")
    assert mech.initial() == b"\0tim\0tanstaaf"
    assert mech.step(b"") == b"\0tim\0tanstaaf"
    assert sasl.Plain("u", "p\u00e4ss", authzid="admin").initial() == b"admin\0u\0p\xc3\xa4ss"


def test_login_answers_user_then_password_then_refuses() -> None:
    """LOGIN sends the user name, then the password; a third challenge is a server error."""
    mech = sasl.Login("alice", "secret")
    assert mech.initial() is None
    assert mech.step(b"Username:") == b"alice"
    assert mech.step(b"Password:") == b"secret"
    with pytest.raises(RemoteProtocolError):
        mech.step(b"More:")


def test_cram_md5_rfc2195_example() -> None:
    """RFC 2195: tim / tanstaaftanstaaf answers the example challenge with its digest."""
    mech = sasl.CramMd5("tim", "tanstaaftanstaaf")
    assert mech.initial() is None
    response = mech.step(b"<1896.697170952@postoffice.reston.mci.net>")
    assert response == b"tim b913a602c7eda7a495b4e6e7334d3890"
    assert base64.b64encode(response) == b"dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw"


def test_xoauth2_initial_response_form() -> None:
    """XOAUTH2 with an initial response matches Google's documented example."""
    mech = sasl.XOAuth2("someuser@example.com", "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg")
    initial = mech.initial()
    assert initial is not None
    assert base64.b64encode(initial) == (
        b"dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDRxbVRjMk52YjNS"
        b"bGNrQmhkSFJoZG1semRHRXVZMjl0Q2cBAQ=="
    )
    # A challenge after the initial response is the JSON error report: answer empty.
    assert mech.step(b'{"status":"401"}') == b""


def test_xoauth2_two_step_form() -> None:
    """The two-step form (Office 365) sends nothing on the AUTH line, the token after '+'."""
    mech = sasl.XOAuth2("u@example.com", "tok", two_step=True)
    assert mech.initial() is None
    assert mech.step(b"") == b"user=u@example.com\x01auth=Bearer tok\x01\x01"
    assert mech.step(b'{"status":"401"}') == b""


def test_oauthbearer_rfc7628_example() -> None:
    """RFC 7628 section 4.1: the initial client response, byte for byte."""
    mech = sasl.OAuthBearer(
        "user@example.com",
        "vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==",
        host="server.example.com",
        port=143,
    )
    assert mech.initial() == (
        b"n,a=user@example.com,\x01host=server.example.com\x01port=143\x01"
        b"auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==\x01\x01"
    )
    assert mech.step(b'{"status":"invalid_token"}') == b"\x01"


def test_oauthbearer_escapes_the_user_name() -> None:
    """A ',' or '=' in the user name is escaped in the GS2 header (RFC 5801)."""
    initial = sasl.OAuthBearer("a,b=c", "t").initial()
    assert initial is not None
    assert initial.startswith(b"n,a=a=2Cb=3Dc,\x01auth=Bearer t")


def test_scram_sha256_rfc7677_example() -> None:
    """RFC 7677: the client-final matches the RFC and the server signature is accepted."""
    mech = scram_after_first()
    assert mech.step(SCRAM_SERVER_FINAL) == b""


def test_scram_rejects_a_wrong_server_signature() -> None:
    """A server that does not know the password is caught by its signature."""
    mech = scram_after_first()
    wrong = base64.b64encode(b"\0" * 32)
    with pytest.raises(RemoteProtocolError, match="signature"):
        mech.step(b"v=" + wrong)


@pytest.mark.parametrize(
    ("server_final", "match"),
    [
        (b"e=invalid-proof", "error"),
        (b"v=not base64!", "base64"),
        (b"v=abc", "base64"),
        (b"", "signature"),
    ],
)
def test_scram_rejects_bad_server_final(server_final: bytes, match: str) -> None:
    """An error, undecodable or missing signature is a RemoteProtocolError."""
    mech = scram_after_first()
    with pytest.raises(RemoteProtocolError, match=match):
        mech.step(server_final)


@pytest.mark.parametrize(
    "server_first",
    [
        b"r=someoneelse,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
        b"r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=0",
        b"r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==",
        b"r=rOprNGfwEbeRWgbNEkqOxyz,i=4096",
        b"r=rOprNGfwEbeRWgbNEkqOxyz,s=W22Za,i=4096",
        b"r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=many",
        "r=rOprNGfwEbeRWgbNEkqO\u00e9,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=1".encode(),
        b"r=rOprNGfwEbeRWgbNEkqO\xff,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=1",
        b"e=other-error",
    ],
)
def test_scram_rejects_bad_server_first(server_first: bytes) -> None:
    """A foreign nonce, zero iterations, missing fields or 8-bit nonce: RemoteProtocolError."""
    mech = sasl.ScramSha256("user", "pencil", nonce=SCRAM_NONCE)
    mech.initial()
    with pytest.raises(RemoteProtocolError):
        mech.step(server_first)


def test_scram_rejects_a_challenge_after_the_final_one() -> None:
    """Once the server is verified, another challenge is a protocol error."""
    mech = scram_after_first()
    mech.step(SCRAM_SERVER_FINAL)
    with pytest.raises(RemoteProtocolError, match="extra"):
        mech.step(SCRAM_SERVER_FINAL)


def test_scram_default_nonce_is_fresh() -> None:
    """Without an injected nonce each exchange gets a different random one."""
    first = sasl.ScramSha256("u", "p").initial()
    second = sasl.ScramSha256("u", "p").initial()
    assert first != second


@settings(max_examples=150, deadline=None)
@given(
    tail=st.binary(max_size=40),
    fields=st.lists(
        st.sampled_from([b"s=QUJD", b"i=2", b"i=x", b"s=*", b"e=x", b"m=1", b"", b"="]),
        max_size=4,
    ),
)
def test_scram_server_first_garbage_raises_only_remote_errors(
    tail: bytes, fields: list[bytes]
) -> None:
    """Any server-first message gives a client-final or a RemoteProtocolError, nothing else."""
    mech = sasl.ScramSha256("user", "pencil", nonce=SCRAM_NONCE)
    mech.initial()
    message = b",".join([b"r=" + SCRAM_NONCE.encode() + tail, *fields])
    try:
        final = mech.step(message)
    except RemoteProtocolError:
        return
    assert final.startswith(b"c=biws,r=" + SCRAM_NONCE.encode())


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("plain", sasl.Plain),
        ("LOGIN", sasl.Login),
        ("cram-md5", sasl.CramMd5),
        ("SCRAM-SHA-256", sasl.ScramSha256),
        ("XOAUTH2", sasl.XOAuth2),
        ("OAUTHBEARER", sasl.OAuthBearer),
    ],
)
def test_make_mechanism_builds_each_supported_name(name: str, kind: type) -> None:
    """Every name in MECHANISMS builds its class, case-insensitively."""
    mech = sasl.make_mechanism(name, "u", "p")
    assert isinstance(mech, kind)
    assert mech.name in sasl.MECHANISMS


def test_make_mechanism_passes_options() -> None:
    """two_step, host and port reach XOAUTH2 and OAUTHBEARER."""
    assert sasl.make_mechanism("xoauth2", "u", "t", two_step=True).initial() is None
    bearer = sasl.make_mechanism("oauthbearer", "u", "t", host="h", port=995).initial()
    assert bearer == b"n,a=u,\x01host=h\x01port=995\x01auth=Bearer t\x01\x01"


def test_make_mechanism_refuses_unknown_names() -> None:
    """An unsupported mechanism is the caller's mistake."""
    with pytest.raises(LocalProtocolError, match="GSSAPI"):
        sasl.make_mechanism("GSSAPI", "u", "p")


def test_preference_is_strongest_first() -> None:
    """auto tries SCRAM before CRAM-MD5 before the plaintext mechanisms."""
    assert sasl.SASL_PREFERENCE == ("SCRAM-SHA-256", "CRAM-MD5", "PLAIN", "LOGIN")
    assert set(sasl.SASL_PREFERENCE) < sasl.MECHANISMS


def test_scram_refuses_huge_iteration_count() -> None:
    """A server-first message with an absurd iteration count is refused before hashing."""
    from popsync.pop3.errors import RemoteProtocolError
    from popsync.pop3.sasl import MAX_SCRAM_ITERATIONS, ScramSha256

    mech = ScramSha256("user", "pencil", nonce="abc")
    server_first = f"r=abcdef,s=QSXCR+Q6sek8bf92,i={MAX_SCRAM_ITERATIONS + 1}".encode()
    with pytest.raises(RemoteProtocolError, match="iteration"):
        mech.step(server_first)
