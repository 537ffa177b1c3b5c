"""Settings from the environment, and the admission rules (tokens, Origin, rate limit)."""

from __future__ import annotations

import pytest

from roomcast.admission import (
    TokenBucket,
    origin_allowed,
    presented_token,
    query_param,
    token_valid,
)
from roomcast.settings import Settings, SettingsError


class TestSettings:
    def test_defaults_without_environment(self) -> None:
        settings = Settings.from_env({})
        assert settings == Settings(archive="sqlite:///roomcast.db")  # a server keeps history
        assert settings.tokens is None and settings.redis_url is None
        assert (settings.history_size, settings.max_text) == (100, 4000)

    def test_every_variable_is_read(self) -> None:
        settings = Settings.from_env(
            {
                "ROOMCAST_TOKENS": "a, b,,c",
                "ROOMCAST_ALLOWED_ORIGINS": "https://x.example,*",
                "ROOMCAST_REDIS_URL": "redis://localhost:6379/0",
                "ROOMCAST_RATE_LIMIT": "2.5",
                "ROOMCAST_ROOM_CAPACITY": "0",
                "ROOMCAST_OUTBOX_SIZE": "8",
                "ROOMCAST_HISTORY_SIZE": "0",
                "ROOMCAST_MAX_TEXT": "10",
                "ROOMCAST_SEND_TIMEOUT": "1.5",
                "ROOMCAST_BATCH_MAX": "4",
            }
        )
        assert settings.tokens == {"a", "b", "c"}
        assert settings.allowed_origins == {"https://x.example", "*"}
        assert settings.redis_url == "redis://localhost:6379/0"
        assert (settings.rate_limit, settings.room_capacity, settings.outbox_size) == (2.5, 0, 8)
        assert (settings.history_size, settings.max_text, settings.send_timeout) == (0, 10, 1.5)
        assert settings.batch_max == 4

    @pytest.mark.parametrize(
        ("name", "value"),
        [
            ("ROOMCAST_RATE_LIMIT", "fast"),
            ("ROOMCAST_RATE_LIMIT", "-1"),
            ("ROOMCAST_RATE_LIMIT", "nan"),
            ("ROOMCAST_OUTBOX_SIZE", "0"),
            ("ROOMCAST_ROOM_CAPACITY", "1.5"),
            ("ROOMCAST_SEND_TIMEOUT", "0"),
            ("ROOMCAST_REDIS_URL", "http://nope"),
            ("ROOMCAST_MAX_TEXT", "many"),
        ],
    )
    def test_bad_value_names_the_variable(self, name: str, value: str) -> None:
        with pytest.raises(SettingsError, match=name):
            Settings.from_env({name: value})

    def test_a_jwt_secret_shorter_than_hs256s_hash_is_refused_without_echoing_it(self) -> None:
        short = "thirty-one-bytes-of-secret-text"
        with pytest.raises(SettingsError, match="ROOMCAST_JWT_SECRET: expected 32 bytes") as bad:
            Settings.from_env({"ROOMCAST_JWT_SECRET": short})
        assert short not in str(bad.value)
        with pytest.raises(SettingsError, match="ROOMCAST_JWT_SECRET"):
            Settings(jwt_secret="x").check()  # given in Python, checked when served
        assert Settings.from_env({"ROOMCAST_JWT_SECRET": short + "!"}).jwt_secret == short + "!"


def headers(**values: str) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode()) for k, v in values.items()]


class TestTokens:
    def test_no_tokens_configured_admits_everyone(self) -> None:
        assert token_valid(Settings(), None)

    @pytest.mark.parametrize(
        ("header_value", "query", "ok"),
        [
            ("Bearer s3cret", None, True),
            ("bearer s3cret", None, True),
            (None, "s3cret", True),
            (None, None, False),
            ("Bearer wrong", None, False),
            (None, "wrong", False),
            ("Bearer wrong", "s3cret", False),  # the header wins
            ("Basic czNjcmV0", "s3cret", True),  # not a bearer header: the query counts
            ("Bearer ", None, False),
        ],
    )
    def test_header_or_query(self, header_value: str | None, query: str | None, ok: bool) -> None:
        settings = Settings(tokens=frozenset({"s3cret", "other"}))
        hs = headers(authorization=header_value) if header_value is not None else []
        assert token_valid(settings, presented_token(hs, query)) is ok

    def test_query_param_is_lenient(self) -> None:
        assert query_param(b"room=%FF&token=abc", "token") == "abc"
        assert query_param(b"room=x", "token") is None


class TestOrigin:
    def test_no_origin_passes(self) -> None:
        assert origin_allowed(Settings(), headers(host="chat.example"))

    @pytest.mark.parametrize(
        ("origin", "host", "ok"),
        [
            ("http://chat.example", "chat.example", True),
            ("https://Chat.Example:8443", "chat.example:8443", True),
            ("http://127.0.0.1:8000", "127.0.0.1:8000", True),
            ("http://evil.example", "chat.example", False),
            ("http://chat.example:9999", "chat.example:8000", False),
            ("null", "chat.example", False),
        ],
    )
    def test_origin_must_match_host(self, origin: str, host: str, ok: bool) -> None:
        assert origin_allowed(Settings(), headers(origin=origin, host=host)) is ok

    def test_allowed_list_and_wildcard(self) -> None:
        listed = Settings(allowed_origins=frozenset({"https://app.example"}))
        assert origin_allowed(listed, headers(origin="https://app.example", host="api.example"))
        assert not origin_allowed(listed, headers(origin="https://x.example", host="api.example"))
        anyone = Settings(allowed_origins=frozenset({"*"}))
        assert origin_allowed(anyone, headers(origin="https://x.example", host="api.example"))


class TestTokenBucket:
    def test_burst_then_steady_rate(self) -> None:
        bucket = TokenBucket(rate=2, burst=4, now=0.0)
        assert [bucket.take(0.0) for _ in range(5)] == [True] * 4 + [False]
        assert bucket.take(0.5)  # one token back after 1/rate seconds
        assert not bucket.take(0.5)
        assert [bucket.take(100.0) for _ in range(5)] == [True] * 4 + [False]  # capped at burst

    def test_clock_going_backwards_grants_nothing(self) -> None:
        bucket = TokenBucket(rate=1, burst=1, now=10.0)
        assert bucket.take(10.0)
        assert not bucket.take(5.0)


def test_readme_documents_every_setting() -> None:
    from pathlib import Path

    from roomcast.settings import describe

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for name, meaning, default in describe():
        assert f"| `{name}` | {meaning} | {default} |" in readme, name
