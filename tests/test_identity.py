"""Signed tokens (``roomcast.identity``), sans I/O: what is accepted, and the reason given
for everything that is not."""

from __future__ import annotations

import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from roomcast.identity import Identity, TokenRejected, TokenVerifier, mint_token, room_pattern

SECRET = "a-secret-of-at-least-thirty-two-bytes!"


def pem(public_key: object) -> str:
    return public_key.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def claims(**overrides: object) -> dict[str, object]:
    now = int(time.time())
    return {"sub": "ann", "name": "Ann", "exp": now + 60, "iat": now, **overrides}


def hs256(payload: dict[str, object], key: str = SECRET) -> str:
    return jwt.encode(payload, key, algorithm="HS256")


NOW = int(time.time())


def test_a_valid_hs256_token_is_the_identity_it_claims() -> None:
    verifier = TokenVerifier(secret=SECRET)
    token = mint_token(SECRET, sub="ann", name="Ann", rooms=["team-*"], ttl=60)
    identity = verifier.verify(token)
    assert (identity.user, identity.name, identity.rooms) == ("ann", "Ann", ("team-*",))
    assert identity.expires == pytest.approx(time.time() + 60, abs=2)
    assert verifier.verify(mint_token(SECRET, sub="bob", ttl=60)).name == "bob"


@pytest.mark.parametrize(
    ("private", "algorithm"),
    [
        (ec.generate_private_key(ec.SECP256R1()), "ES256"),
        (rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256"),
        (ed25519.Ed25519PrivateKey.generate(), "EdDSA"),
    ],
    ids=["ES256", "RS256", "EdDSA"],
)
def test_public_key_tokens(private: object, algorithm: str) -> None:
    verifier = TokenVerifier(public_key=pem(private.public_key()))  # type: ignore[attr-defined]
    assert verifier.algorithm == algorithm
    token = jwt.encode(claims(), private, algorithm=algorithm)  # type: ignore[arg-type]
    assert verifier.verify(token).user == "ann"
    # the key decides the algorithm: an HS256 token signed with the public key's PEM fails
    forged = jwt.encode(claims(), SECRET, algorithm="HS256")
    with pytest.raises(TokenRejected, match="invalid signature"):
        verifier.verify(forged)


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (None, "missing token"),
        ("", "missing token"),
        ("not.a.jwt", "malformed token"),
        ("x" * 50, "malformed token"),
        (
            jwt.encode(claims(), "another-secret-of-thirty-two-bytes!!", algorithm="HS256"),
            "invalid signature",
        ),
        (jwt.encode(claims(), None, algorithm="none"), "invalid signature"),
        (jwt.encode(claims(exp=int(time.time()) - 60), SECRET, algorithm="HS256"), "token expired"),
        (
            jwt.encode(claims(nbf=int(time.time()) + 60), SECRET, algorithm="HS256"),
            "token not yet valid",
        ),
        (jwt.encode({"sub": "ann"}, SECRET, algorithm="HS256"), "token has no exp claim"),
        (
            jwt.encode({"exp": int(time.time()) + 60}, SECRET, algorithm="HS256"),
            "token has no sub claim",
        ),
        (jwt.encode(claims(rooms="team-*"), SECRET, algorithm="HS256"), "the rooms claim must be"),
        (jwt.encode(claims(name="a\u200bnn"), SECRET, algorithm="HS256"), "the name claim is not"),
        (jwt.encode(claims(sub=7), SECRET, algorithm="HS256"), "malformed token"),
    ],
)
def test_every_rejection_says_which_problem(token: str | None, reason: str) -> None:
    with pytest.raises(TokenRejected) as rejected:
        TokenVerifier(secret=SECRET).verify(token)
    assert rejected.value.reason.startswith(reason)


def test_audience_and_issuer_are_checked_when_configured() -> None:
    verifier = TokenVerifier(secret=SECRET, audience="chat", issuer="https://auth.example")
    good = mint_token(SECRET, sub="ann", ttl=60, audience="chat", issuer="https://auth.example")
    assert verifier.verify(good).user == "ann"
    for token, reason in [
        (
            mint_token(SECRET, sub="a", ttl=60, audience="other", issuer="https://auth.example"),
            "wrong audience",
        ),
        (
            mint_token(SECRET, sub="a", ttl=60, audience="chat", issuer="https://evil.example"),
            "wrong issuer",
        ),
    ]:
        with pytest.raises(TokenRejected, match=reason):
            verifier.verify(token)


def test_room_patterns_match_whole_names_with_star_as_wildcard() -> None:
    ann = Identity("ann", "Ann", ("team-*", "lobby", "a.b"), time.time() + 60)
    assert ann.may_enter("team-red") and ann.may_enter("team-") and ann.may_enter("lobby")
    assert not ann.may_enter("lobby2") and not ann.may_enter("xteam-red")
    assert not ann.may_enter("aXb")  # "." is a dot, not "any character"
    assert Identity("bob", "bob", None, 0).may_enter("anything")
    assert room_pattern("*").fullmatch("x")
