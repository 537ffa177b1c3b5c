"""Who a connection is: signed tokens (SPEC §8.1), verified with PyJWT, never by hand.

A :class:`TokenVerifier` is built once at startup from ``ROOMCAST_JWT_SECRET`` (HS256) or
``ROOMCAST_JWT_PUBLIC_KEY`` (a PEM public key: RSA for RS256, P-256 for ES256, Ed25519 for
EdDSA; the key decides the one algorithm accepted, so a token cannot pick a weaker one).
:meth:`TokenVerifier.verify` turns a token into an :class:`Identity` or refuses it with a
:class:`TokenRejected` whose reason goes into the 4001 close as is ("token expired",
"invalid signature", ...): it says which problem, never anything secret.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from .names import BadName, normalize_name

__all__ = [
    "Identity",
    "TokenRejected",
    "TokenVerifier",
    "identity_from_claims",
    "mint_token",
    "room_matches",
]

#: accepted clock difference between the token's issuer and this server, in seconds
LEEWAY: Final = 5.0
#: most entries in a token's ``rooms`` claim (each join and refresh checks them all)
MAX_ROOM_GRANTS: Final = 1000
#: the 4001 reason for a ``sub`` that is not a string (PyJWT's check) or not 1-256 long
BAD_SUB: Final = "the sub claim must be a string of 1-256 characters"


class TokenRejected(Exception):
    """A token that does not identify anyone; ``reason`` is for the 4001 close."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Identity:
    """A verified user: ``user`` (the ``sub`` claim), the display ``name`` (its ``name``
    claim, normalised; ``sub`` without one), the ``rooms`` it may enter (patterns with
    ``*``; ``None`` for every room) and when it ``expires`` (seconds since the epoch)."""

    user: str
    name: str
    rooms: tuple[str, ...] | None
    expires: float

    def may_enter(self, room: str) -> bool:
        return self.rooms is None or any(room_matches(p, room) for p in self.rooms)


def room_matches(pattern: str, room: str) -> bool:
    """Whether ``room`` fits a ``rooms`` claim entry, where ``*`` is any run of characters
    and nothing else is special.

    Without backtracking (each part is looked for once, left to right): a regex of many
    stars (``*a*a*a*a*a*a*a*b``) backtracks for seconds against a long room name, and the
    client chooses the name.
    """
    if "*" not in pattern:
        return room == pattern
    head, *middle, tail = pattern.split("*")
    end = len(room) - len(tail)
    if end < len(head) or not room.startswith(head) or not room.endswith(tail):
        return False
    position = len(head)
    for part in middle:  # each part as early as it fits leaves the most room for the rest
        found = room.find(part, position, end)
        if found < 0:
            return False
        position = found + len(part)
    return True


class TokenVerifier:
    """Verifies tokens against one key.

    :raises ValueError: if ``public_key`` is not a PEM RSA, P-256 or Ed25519 public key
    """

    def __init__(
        self,
        *,
        secret: str | None = None,
        public_key: str | None = None,
        audience: str | None = None,
        issuer: str | None = None,
    ) -> None:
        if (secret is None) == (public_key is None):
            raise ValueError("give a secret or a public key, not both")
        self.audience = audience
        self.issuer = issuer
        if secret is not None:
            self._key: Any = secret
            self.algorithm = "HS256"
        else:
            assert public_key is not None
            self._key, self.algorithm = _load_public_key(public_key)

    def verify(self, token: str | None) -> Identity:
        """:raises TokenRejected: with the reason (missing, malformed, invalid signature,
        expired, not yet valid, wrong audience, wrong issuer, a missing or bad claim)"""
        if not token:
            raise TokenRejected("missing token")
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[self.algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=LEEWAY,
                options={"require": ["sub", "exp"], "verify_aud": self.audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise TokenRejected("token expired") from None
        except jwt.ImmatureSignatureError:
            raise TokenRejected("token not yet valid") from None
        except jwt.InvalidAudienceError:
            raise TokenRejected("wrong audience") from None
        except jwt.InvalidIssuerError:
            raise TokenRejected("wrong issuer") from None
        except jwt.MissingRequiredClaimError as missing:
            raise TokenRejected(f"token has no {missing.claim} claim") from None
        except (jwt.InvalidSignatureError, jwt.InvalidAlgorithmError):
            raise TokenRejected("invalid signature") from None
        except jwt.exceptions.InvalidSubjectError:  # PyJWT checks that sub is a string
            raise TokenRejected(BAD_SUB) from None
        except jwt.InvalidTokenError:
            raise TokenRejected("malformed token") from None
        return identity_from_claims(claims)


def identity_from_claims(claims: Mapping[str, Any]) -> Identity:
    """Who a verified token's claims say the user is.

    :raises TokenRejected: for a ``sub``, ``name``, ``rooms`` or ``exp`` this server cannot
        use (the reason says which)
    """
    user, name, rooms = claims["sub"], claims.get("name"), claims.get("rooms")
    if not isinstance(user, str) or not user or len(user) > 256:
        raise TokenRejected(BAD_SUB)
    try:
        name = normalize_name(user[:32] if name is None else name)
    except (BadName, TypeError, AttributeError):
        raise TokenRejected("the name claim is not a usable display name") from None
    if rooms is not None and not (
        isinstance(rooms, list)
        and len(rooms) <= MAX_ROOM_GRANTS
        and all(isinstance(room, str) for room in rooms)
    ):
        raise TokenRejected(
            f"the rooms claim must be a list of at most {MAX_ROOM_GRANTS} room names"
        )
    try:
        expires = float(claims["exp"])
    except OverflowError:  # PyJWT takes any integer: 10**400 is in the future too
        raise TokenRejected("the exp claim is out of range") from None
    return Identity(user, name, None if rooms is None else tuple(rooms), expires)


def _load_public_key(pem: str) -> tuple[Any, str]:
    try:
        key = load_pem_public_key(pem.encode())
    except ValueError as exc:
        raise ValueError(f"not a PEM public key: {exc}") from None
    if isinstance(key, rsa.RSAPublicKey):
        return key, "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key, "ES256"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key, "EdDSA"
    raise ValueError("expected an RSA, P-256 (ES256) or Ed25519 (EdDSA) public key")


def mint_token(
    secret: str,
    *,
    sub: str,
    ttl: float,
    name: str | None = None,
    rooms: Sequence[str] | None = None,
    audience: str | None = None,
    issuer: str | None = None,
    now: float | None = None,
) -> str:
    """An HS256 token for ``sub``, valid ``ttl`` seconds (``roomcast token``, tests)."""
    issued = time.time() if now is None else now
    claims: dict[str, Any] = {"sub": sub, "iat": int(issued), "exp": int(issued + ttl)}
    if name is not None:
        claims["name"] = name
    if rooms is not None:
        claims["rooms"] = list(rooms)
    if audience is not None:
        claims["aud"] = audience
    if issuer is not None:
        claims["iss"] = issuer
    return jwt.encode(claims, secret, algorithm="HS256")
