"""Settings: CX_ environment -> one frozen, validated object; bad values name the setting."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from service.settings import (
    SaslMechanism,
    SecurityProtocol,
    Settings,
    SettingsError,
    load_settings,
)

pytestmark = pytest.mark.unit

KEY = "test-pii-key-0123456789"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No CX_ variable of the machine running the tests leaks in."""
    for name in list(os.environ):
        if name.upper().startswith("CX_"):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    s = load_settings()
    assert s.kafka_bootstrap_servers == "localhost:9092"
    assert s.topic_prefix == "cx"
    assert s.http_port == 6066
    assert s.data_dir == Path("./data")
    assert s.pii_key is None
    assert s.dedup_horizon == timedelta(hours=24)
    assert s.max_clock_skew == timedelta(minutes=5)
    assert s.max_payload_bytes == 65536
    assert s.emit_interval == timedelta(seconds=1)
    assert s.min_responses == 30
    assert s.kafka_security_protocol is SecurityProtocol.PLAINTEXT
    assert s.consumer_group == "cx-cxpulse"


def test_env_vars_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CX_KAFKA_BOOTSTRAP_SERVERS", "k1:9092,k2:9092")
    monkeypatch.setenv("CX_TOPIC_PREFIX", "acme")
    monkeypatch.setenv("CX_HTTP_PORT", "8080")
    monkeypatch.setenv("CX_DATA_DIR", "/var/lib/cx")
    monkeypatch.setenv("CX_PII_KEY", KEY)
    monkeypatch.setenv("CX_DEDUP_HORIZON", "48h")
    monkeypatch.setenv("CX_MAX_CLOCK_SKEW", "90s")
    monkeypatch.setenv("CX_MAX_PAYLOAD_BYTES", "1024")
    monkeypatch.setenv("CX_EMIT_INTERVAL", "250ms")
    s = load_settings()
    assert s.kafka_bootstrap_servers == "k1:9092,k2:9092"
    assert s.topic_prefix == "acme"
    assert s.consumer_group == "acme-cxpulse"
    assert s.http_port == 8080
    assert s.data_dir == Path("/var/lib/cx")
    assert s.require_pii_key() == KEY.encode()
    assert s.dedup_horizon == timedelta(hours=48)
    assert s.max_clock_skew == timedelta(seconds=90)
    assert s.max_payload_bytes == 1024
    assert s.emit_interval == timedelta(milliseconds=250)


def test_overrides_win_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CX_HTTP_PORT", "8080")
    assert load_settings(http_port=9090).http_port == 9090


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("5m", timedelta(minutes=5)),
        ("24h", timedelta(hours=24)),
        ("30d", timedelta(days=30)),
        ("250ms", timedelta(milliseconds=250)),
        ("1.5s", timedelta(milliseconds=1500)),
        (" 2m ", timedelta(minutes=2)),
        ("42", timedelta(seconds=42)),
        (42, timedelta(seconds=42)),
        (0.5, timedelta(milliseconds=500)),
        ("PT24H", timedelta(hours=24)),
        ("PT1M30S", timedelta(seconds=90)),
        ("P1D", timedelta(days=1)),
    ],
)
def test_duration_forms(text: Any, expected: timedelta) -> None:
    assert load_settings(emit_interval=text).emit_interval == expected


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ("CX_DEDUP_HORIZON", ("dedup_horizon", "30d", timedelta(days=30))),
        ("CX_DEDUP_HORIZON", ("dedup_horizon", "P2D", timedelta(days=2))),
        ("CX_MAX_CLOCK_SKEW", ("max_clock_skew", "0", timedelta(0))),
        ("CX_MAX_CLOCK_SKEW", ("max_clock_skew", "250ms", timedelta(milliseconds=250))),
        ("CX_EMIT_INTERVAL", ("emit_interval", "5m", timedelta(minutes=5))),
    ],
)
def test_duration_from_env(
    monkeypatch: pytest.MonkeyPatch, env: str, expected: tuple[str, str, timedelta]
) -> None:
    attr, text, value = expected
    monkeypatch.setenv(env, text)
    assert getattr(load_settings(), attr) == value


BAD_OVERRIDES = [
    ("CX_HTTP_PORT", {"http_port": 0}),
    ("CX_HTTP_PORT", {"http_port": 65536}),
    ("CX_HTTP_PORT", {"http_port": "http"}),
    ("CX_TOPIC_PREFIX", {"topic_prefix": "cx prod"}),
    ("CX_TOPIC_PREFIX", {"topic_prefix": ""}),
    ("CX_TOPIC_PREFIX", {"topic_prefix": ".cx"}),
    ("CX_KAFKA_BOOTSTRAP_SERVERS", {"kafka_bootstrap_servers": ""}),
    ("CX_PARTITIONS", {"partitions": 0}),
    ("CX_PII_KEY", {"pii_key": "   "}),
    ("CX_DEDUP_HORIZON", {"dedup_horizon": "23h"}),
    ("CX_DEDUP_HORIZON", {"dedup_horizon": "86399s"}),
    ("CX_DEDUP_HORIZON", {"dedup_horizon": "a day"}),
    ("CX_MAX_CLOCK_SKEW", {"max_clock_skew": "-5m"}),
    ("CX_MAX_CLOCK_SKEW", {"max_clock_skew": -1}),
    ("CX_MAX_CLOCK_SKEW", {"max_clock_skew": "5 minutes"}),
    ("CX_EMIT_INTERVAL", {"emit_interval": "0s"}),
    ("CX_EMIT_INTERVAL", {"emit_interval": "1w"}),
    ("CX_MAX_PAYLOAD_BYTES", {"max_payload_bytes": 255}),
    ("CX_MAX_PAYLOAD_BYTES", {"max_payload_bytes": "64KiB"}),
    ("CX_MIN_RESPONSES", {"min_responses": 0}),
    ("CX_DEDUP_MAX_IDS", {"dedup_max_ids": 10}),
    ("CX_LOG_LEVEL", {"log_level": "verbose"}),
    ("CX_KAFKA_SECURITY_PROTOCOL", {"kafka_security_protocol": "TLS"}),
    ("CX_KAFKA_SASL_MECHANISM", {"kafka_sasl_mechanism": "GSSAPI"}),
    ("CX_CREATE_TOPICS", {"create_topics": "maybe"}),
]


@pytest.mark.parametrize(("name", "overrides"), BAD_OVERRIDES)
def test_bad_override_names_the_setting(name: str, overrides: dict[str, Any]) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(**overrides)
    message = str(info.value)
    assert name in message
    assert "\n" not in message


BAD_ENV = [
    ("CX_HTTP_PORT", "abc"),
    ("CX_HTTP_PORT", "70000"),
    ("CX_HTTP_PORT", "-1"),
    ("CX_TOPIC_PREFIX", "cx/prod"),
    ("CX_PII_KEY", ""),
    ("CX_DEDUP_HORIZON", "12h"),
    ("CX_DEDUP_HORIZON", "forever"),
    ("CX_MAX_CLOCK_SKEW", "soon"),
    ("CX_MAX_PAYLOAD_BYTES", "lots"),
    ("CX_MAX_PAYLOAD_BYTES", "100"),
    ("CX_EMIT_INTERVAL", "0"),
    ("CX_KAFKA_SECURITY_PROTOCOL", "plaintext-ish"),
    ("CX_PARTITIONS", "1.5"),
]


@pytest.mark.parametrize(("name", "value"), BAD_ENV)
def test_bad_env_names_the_setting(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = str(info.value)
    assert name in message
    assert "\n" not in message


def test_lower_case_env_var_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("cx_http_port", "7070")
    assert load_settings().http_port == 7070


def test_dedup_horizon_of_exactly_a_day_and_more_accepted() -> None:
    assert load_settings(dedup_horizon="24h").dedup_horizon == timedelta(days=1)
    assert load_settings(dedup_horizon="86400").dedup_horizon == timedelta(days=1)
    assert load_settings(dedup_horizon="7d").dedup_horizon == timedelta(days=7)


def test_dedup_horizon_below_a_day_refused() -> None:
    with pytest.raises(SettingsError, match="CX_DEDUP_HORIZON"):
        load_settings(dedup_horizon=timedelta(hours=23, minutes=59, seconds=59))


@pytest.mark.parametrize("value", ["1000000000d", "9" * 400 + "s"])
def test_oversized_duration_is_a_settings_error(value: str) -> None:
    with pytest.raises(SettingsError, match="CX_DEDUP_HORIZON"):
        load_settings(dedup_horizon=value)


def test_sasl_plaintext_refused_unless_allowed() -> None:
    creds = {"kafka_sasl_username": "svc", "kafka_sasl_password": "s3cret-password"}
    with pytest.raises(SettingsError) as info:
        load_settings(kafka_security_protocol="SASL_PLAINTEXT", **creds)
    assert "CX_KAFKA_SECURITY_PROTOCOL" in str(info.value)
    assert "CX_KAFKA_ALLOW_SASL_PLAINTEXT" in str(info.value)
    allowed = load_settings(
        kafka_security_protocol="SASL_PLAINTEXT", kafka_allow_sasl_plaintext=True, **creds
    )
    assert allowed.kafka_security_protocol is SecurityProtocol.SASL_PLAINTEXT


def test_sasl_plaintext_allowed_through_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CX_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("CX_KAFKA_SASL_USERNAME", "svc")
    monkeypatch.setenv("CX_KAFKA_SASL_PASSWORD", "s3cret-password")
    with pytest.raises(SettingsError, match="CX_KAFKA_SECURITY_PROTOCOL"):
        load_settings()
    monkeypatch.setenv("CX_KAFKA_ALLOW_SASL_PLAINTEXT", "true")
    assert load_settings().kafka_sasl_username == "svc"


@pytest.mark.parametrize("protocol", ["SASL_SSL", "SASL_PLAINTEXT"])
@pytest.mark.parametrize(
    "creds",
    [{}, {"kafka_sasl_username": "svc"}, {"kafka_sasl_password": "s3cret-password"}],
)
def test_sasl_without_credentials_refused(protocol: str, creds: dict[str, str]) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(kafka_security_protocol=protocol, kafka_allow_sasl_plaintext=True, **creds)
    assert "CX_KAFKA_SASL_USERNAME" in str(info.value)
    assert "CX_KAFKA_SASL_PASSWORD" in str(info.value)


def test_sasl_ssl_with_credentials() -> None:
    s = load_settings(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="svc",
        kafka_sasl_password="s3cret-password",  # noqa: S106 - test data
    )
    assert s.kafka_sasl_mechanism is SaslMechanism.SCRAM_SHA_512
    assert s.kafka_sasl_password is not None
    assert s.kafka_sasl_password.get_secret_value() == "s3cret-password"


def test_frozen() -> None:
    s = load_settings()
    with pytest.raises(ValidationError):
        s.http_port = 1  # type: ignore[misc]
    assert s.http_port == 6066


def test_require_pii_key_without_key() -> None:
    with pytest.raises(SettingsError, match="CX_PII_KEY"):
        load_settings().require_pii_key()


def test_require_pii_key_with_key() -> None:
    assert load_settings(pii_key=KEY).require_pii_key() == b"test-pii-key-0123456789"


def test_short_pii_key_works_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    assert load_settings(pii_key="short").require_pii_key() == b"short"
    assert "CX_PII_KEY is shorter than 16" in caplog.text
    caplog.clear()
    load_settings(pii_key=KEY).require_pii_key()
    assert "CX_PII_KEY" not in caplog.text


def test_secrets_do_not_leak_in_repr() -> None:
    s = load_settings(
        pii_key=KEY,
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_username="svc",
        kafka_sasl_password="hunter2-hunter2",  # noqa: S106 - test data
        kafka_ssl_key_password="tls-key-pass-123",  # noqa: S106 - test data
    )
    for text in (repr(s), str(s), repr(s.pii_key), str(s.pii_key)):
        assert KEY not in text
        assert "hunter2-hunter2" not in text
        assert "tls-key-pass-123" not in text
    assert "svc" in repr(s)


def test_settings_error_does_not_echo_secrets() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(
            pii_key="tiny-secret",
            kafka_security_protocol="SASL_PLAINTEXT",
            kafka_sasl_username="svc",
            kafka_sasl_password="hunter2-hunter2",  # noqa: S106 - test data
        )
    assert "CX_KAFKA_SECURITY_PROTOCOL" in str(info.value)
    assert "tiny-secret" not in str(info.value)
    assert "hunter2" not in str(info.value)


def test_settings_class_is_the_result_type() -> None:
    assert isinstance(load_settings(), Settings)
