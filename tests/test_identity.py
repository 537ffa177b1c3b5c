"""Signed tokens (``roomcast.identity``), sans I/O: what is accepted, and the reason given
for everything that is not."""

from __future__ import annotations

import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from roomcast.identity import (
    MAX_ROOM_GRANTS,
    Identity,
    TokenRejected,
    TokenVerifier,
    mint_token,
    room_matches,
)

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


def _token(kind: str) -> str | None:
    """The token for a rejection case, made when the test runs (tokens expire)."""
    now = int(time.time())
    made: dict[str, object] = {
        "none": None,
        "empty": "",
        "dots": "not.a.jwt",
        "junk": "x" * 50,
        "other key": hs256(claims(), "another-secret-of-thirty-two-bytes!!"),
        "alg none": jwt.encode(claims(), None, algorithm="none"),
        "expired": hs256(claims(exp=now - 60)),
        "not yet": hs256(claims(nbf=now + 60)),
        "no exp": hs256({"sub": "ann"}),
        "no sub": hs256({"exp": now + 60}),
        "rooms": hs256(claims(rooms="team-*")),
        "name": hs256(claims(name="a\u200bnn")),
        "sub": hs256(claims(sub=7)),
    }
    token = made[kind]
    assert token is None or isinstance(token, str)
    return token


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("none", "missing token"),
        ("empty", "missing token"),
        ("dots", "malformed token"),
        ("junk", "malformed token"),
        ("other key", "invalid signature"),
        ("alg none", "invalid signature"),
        ("expired", "token expired"),
        ("not yet", "token not yet valid"),
        ("no exp", "token has no exp claim"),
        ("no sub", "token has no sub claim"),
        ("rooms", "the rooms claim must be"),
        ("name", "the name claim is not"),
        ("sub", "the sub claim must be a string of 1-256 characters"),
    ],
)
def test_every_rejection_says_which_problem(kind: str, reason: str) -> None:
    with pytest.raises(TokenRejected) as rejected:
        TokenVerifier(secret=SECRET).verify(_token(kind))
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
    assert room_matches("*", "x") and room_matches("*", "")


@pytest.mark.parametrize(
    ("pattern", "room", "fits"),
    [
        ("team-*", "team-red", True),
        ("*-red", "team-red", True),
        ("t*m-*d", "team-red", True),
        ("a*a", "a", False),  # head and tail may not overlap
        ("a*a", "aa", True),
        ("*ab*ab*", "xabyab", True),
        ("*ab*ab*", "xab", False),
        ("**", "anything", True),
        ("lobby", "lobby", True),
        ("lobby", "lobby2", False),
    ],
)
def test_room_matches_is_a_glob_with_star_only(pattern: str, room: str, fits: bool) -> None:
    assert room_matches(pattern, room) is fits


def test_many_stars_against_a_long_room_name_do_not_backtrack() -> None:
    """A regex took 58 s for 8 stars against 64 characters, doubling with each star; 30
    would not end. (The bound is a guard against a hang, not a speed target: this takes
    about a millisecond.)"""
    pattern = "*a" * 30 + "*b"
    started = time.perf_counter()
    assert not room_matches(pattern, "a" * 64)
    assert room_matches(pattern, "a" * 64 + "b")
    assert time.perf_counter() - started < 10


def test_token_claims_that_would_cost_the_server_are_refused() -> None:
    verifier = TokenVerifier(secret=SECRET)
    many = mint_token(
        SECRET, sub="ann", ttl=60, rooms=[f"r{i}" for i in range(MAX_ROOM_GRANTS + 1)]
    )
    with pytest.raises(TokenRejected, match="at most 1000 room names"):
        verifier.verify(many)
    huge_exp = jwt.encode({"sub": "ann", "exp": 10**400}, SECRET, algorithm="HS256")
    with pytest.raises(TokenRejected, match="the exp claim is out of range"):
        verifier.verify(huge_exp)
