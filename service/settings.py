"""Settings: environment variables with the `CX_` prefix -> one frozen, validated object.

This is the only module that reads the environment. Everything else receives a `Settings`.
"""

from __future__ import annotations

import logging
import re
import socket
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger(__name__)
WEAK_KEY_LENGTH = 16
_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)?\s*$")
_MAX_DURATION = timedelta(days=3650)
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: Any) -> Any:
    """'90s' | '5m' | '24h' | '30d' | '250ms' | seconds -> timedelta; others pass on."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value > _MAX_DURATION.total_seconds():
            raise ValueError("is too long (at most 3650d)")
        return timedelta(seconds=value)
    if isinstance(value, str):
        match = _DURATION.fullmatch(value)
        if match:
            seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
            if seconds > _MAX_DURATION.total_seconds():
                raise ValueError("is too long (at most 3650d)")
            return timedelta(seconds=seconds)
    # Anything else (ISO 8601 "PT24H", ...) is left to pydantic's own timedelta parsing.
    return value


def _positive(value: timedelta) -> timedelta:
    if value <= timedelta(0):
        raise ValueError("must be a positive duration, e.g. 30s, 5m, 24h")
    return _bounded(value)


def _not_negative(value: timedelta) -> timedelta:
    if value < timedelta(0):
        raise ValueError("must not be negative")
    return _bounded(value)


def _bounded(value: timedelta) -> timedelta:
    if value > _MAX_DURATION:
        raise ValueError("is too long (at most 3650d)")
    return value


Duration = Annotated[timedelta, BeforeValidator(parse_duration), AfterValidator(_positive)]
NonNegativeDuration = Annotated[
    timedelta, BeforeValidator(parse_duration), AfterValidator(_not_negative)
]


class SecurityProtocol(StrEnum):
    PLAINTEXT = "PLAINTEXT"
    SSL = "SSL"
    SASL_PLAINTEXT = "SASL_PLAINTEXT"
    SASL_SSL = "SASL_SSL"


class SaslMechanism(StrEnum):
    PLAIN = "PLAIN"
    SCRAM_SHA_256 = "SCRAM-SHA-256"
    SCRAM_SHA_512 = "SCRAM-SHA-512"


class Settings(BaseSettings):
    """Every `CX_` setting, validated once at start; frozen afterwards."""

    model_config = SettingsConfigDict(
        env_prefix="CX_", frozen=True, extra="ignore", case_sensitive=False
    )

    # Kafka
    kafka_bootstrap_servers: str = Field(default="localhost:9092", min_length=1)
    topic_prefix: str = Field(default="cx", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,100}$")
    group_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")
    partitions: int = Field(default=8, ge=1, le=1024)
    replication_factor: int = Field(default=1, ge=1, le=16)
    create_topics: bool = True
    kafka_session_timeout: Duration = timedelta(seconds=10)
    kafka_rebalance_timeout: Duration = timedelta(seconds=8)
    kafka_fetch_max_wait: Duration = timedelta(milliseconds=100)
    kafka_security_protocol: SecurityProtocol = SecurityProtocol.PLAINTEXT
    kafka_sasl_mechanism: SaslMechanism = SaslMechanism.PLAIN
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None
    kafka_ssl_key_password: SecretStr | None = None
    kafka_ssl_check_hostname: bool = True
    kafka_allow_sasl_plaintext: bool = False
    # Faust refuses local state newer than the changelog's end. Keep it on with Apache Kafka;
    # the embedded Tansu broker under-reports end offsets, so `cxpulse dev` and tests turn it off.
    recovery_consistency_check: bool = True

    # Service
    http_host: str = "0.0.0.0"  # noqa: S104 - a service in a container listens on all interfaces
    http_port: int = Field(default=6066, ge=1, le=65535)
    data_dir: Path = Path("./data")
    shutdown_timeout: Duration = timedelta(seconds=30)
    state_scan_interval: Duration = timedelta(seconds=30)
    log_format: Literal["json", "text"] = "json"
    log_level: str = Field(default="INFO", pattern=r"^(?i:debug|info|warning|error|critical)$")

    # Ingestion
    pii_key: SecretStr | None = None
    dedup_horizon: Duration = timedelta(hours=24)
    dedup_max_ids: int = Field(default=1_000_000, ge=1_000, le=100_000_000)
    max_clock_skew: NonNegativeDuration = timedelta(minutes=5)
    max_payload_bytes: int = Field(default=64 * 1024, ge=256, le=16 * 1024 * 1024)

    # Customers
    timeline_max_events: int = Field(default=100, ge=1, le=10_000)
    timeline_max_age: Duration = timedelta(days=365)
    http_advertised_url: str | None = Field(default=None, pattern=r"^https?://[^/\s]+$")
    http_delete_enabled: bool = False

    # Metrics
    emit_interval: Duration = timedelta(seconds=1)
    min_responses: int = Field(default=30, ge=1, le=1_000_000)

    @field_validator("dedup_horizon")
    @classmethod
    def _horizon_at_least_a_day(cls, value: timedelta) -> timedelta:
        if value < timedelta(hours=24):
            raise ValueError("must be at least 24h (the contract's minimum horizon)")
        return value

    @field_validator("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile")
    @classmethod
    def _file_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"no such file: {value}")
        return value

    @field_validator("pii_key")
    @classmethod
    def _key_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("must not be empty")
        return value

    @model_validator(mode="after")
    def _security_consistent(self) -> Settings:
        sasl = self.kafka_security_protocol in (
            SecurityProtocol.SASL_PLAINTEXT,
            SecurityProtocol.SASL_SSL,
        )
        if sasl and not (self.kafka_sasl_username and self.kafka_sasl_password):
            raise ValueError(
                "CX_KAFKA_SASL_USERNAME and CX_KAFKA_SASL_PASSWORD are required with "
                f"CX_KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol.value}"
            )
        if (
            self.kafka_security_protocol is SecurityProtocol.SASL_PLAINTEXT
            and not self.kafka_allow_sasl_plaintext
        ):
            raise ValueError(
                "CX_KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT sends credentials in clear text; "
                "use SASL_SSL or set CX_KAFKA_ALLOW_SASL_PLAINTEXT=true"
            )
        return self

    @property
    def advertised_url(self) -> str:
        """Where other workers reach this one's HTTP server (to forward customer reads)."""
        return self.http_advertised_url or f"http://{socket.gethostname()}:{self.http_port}"

    @property
    def consumer_group(self) -> str:
        """The Kafka consumer group (and Faust app id): CX_GROUP_ID or '{prefix}-cxpulse'."""
        return self.group_id or f"{self.topic_prefix}-cxpulse"

    def require_pii_key(self) -> bytes:
        """The HMAC key as bytes; a worker cannot run without one."""
        if self.pii_key is None:
            raise SettingsError("CX_PII_KEY: required to hash identifiers (use 32+ random bytes)")
        key = self.pii_key.get_secret_value()
        if len(key) < WEAK_KEY_LENGTH:
            log.warning(
                "CX_PII_KEY is shorter than %d characters: hashes are easier to guess",
                WEAK_KEY_LENGTH,
            )
        return key.encode()


class SettingsError(Exception):
    """A bad setting, with a one-line message that names it."""


def load_settings(**overrides: Any) -> Settings:
    """Environment (+ overrides) -> Settings, or SettingsError naming the first bad setting."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise SettingsError(describe_settings_error(exc)) from None


def describe_settings_error(exc: ValidationError) -> str:
    """A pydantic error -> 'CX_NAME: what is wrong' (one line)."""
    first = exc.errors()[0]
    loc = first.get("loc") or ()
    message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    more = len(exc.errors()) - 1
    suffix = f" (and {more} more)" if more else ""
    if not loc:  # a rule across settings: its message names them
        return f"invalid settings: {message}{suffix}"
    return f"invalid setting CX_{str(loc[0]).upper()}: {message}{suffix}"
