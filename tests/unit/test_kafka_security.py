"""Kafka security settings -> the options handed to aiokafka and to Faust (no TLS broker here,
so this checks the configuration objects)."""

from __future__ import annotations

import ssl

import faust
import pytest

from service.kafka import kafka_client_kwargs
from service.settings import SettingsError, load_settings
from service.worker import _credentials

pytestmark = pytest.mark.unit

BASE = {"kafka_bootstrap_servers": "k1:9093,k2:9093", "pii_key": "test-pii-key-0123456789"}


def test_plaintext_has_no_tls_and_no_sasl() -> None:
    kwargs = kafka_client_kwargs(load_settings(**BASE))
    assert kwargs == {"bootstrap_servers": "k1:9093,k2:9093", "security_protocol": "PLAINTEXT"}
    assert _credentials(load_settings(**BASE)) is None


def test_ssl_gets_a_verifying_context() -> None:
    settings = load_settings(**BASE, kafka_security_protocol="SSL")
    kwargs = kafka_client_kwargs(settings)
    assert kwargs["security_protocol"] == "SSL"
    context = kwargs["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.check_hostname is True
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert "sasl_mechanism" not in kwargs
    assert isinstance(_credentials(settings), faust.SSLCredentials)


def test_hostname_check_can_be_turned_off() -> None:
    settings = load_settings(**BASE, kafka_security_protocol="SSL", kafka_ssl_check_hostname=False)
    assert kafka_client_kwargs(settings)["ssl_context"].check_hostname is False


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_ssl(mechanism: str) -> None:
    settings = load_settings(
        **BASE,
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism=mechanism,
        kafka_sasl_username="svc-cxpulse",
        kafka_sasl_password="s3cret-pass",  # noqa: S106 - test data
    )
    kwargs = kafka_client_kwargs(settings)
    assert kwargs["security_protocol"] == "SASL_SSL"
    assert kwargs["sasl_mechanism"] == mechanism
    assert kwargs["sasl_plain_username"] == "svc-cxpulse"
    assert kwargs["sasl_plain_password"] == "s3cret-pass"  # noqa: S105 - test data
    assert isinstance(kwargs["ssl_context"], ssl.SSLContext)
    credentials = _credentials(settings)
    assert isinstance(credentials, faust.SASLCredentials)
    assert credentials.username == "svc-cxpulse"
    assert credentials.password == "s3cret-pass"  # noqa: S105 - test data
    assert str(credentials.mechanism.value) == mechanism
    assert credentials.ssl_context is not None
    assert "s3cret-pass" not in repr(settings)


def test_sasl_over_plaintext_only_when_allowed() -> None:
    sasl = {
        "kafka_security_protocol": "SASL_PLAINTEXT",
        "kafka_sasl_username": "u",
        "kafka_sasl_password": "p",
    }
    with pytest.raises(SettingsError, match="SASL_PLAINTEXT"):
        load_settings(**BASE, **sasl)
    settings = load_settings(**BASE, **sasl, kafka_allow_sasl_plaintext=True)
    kwargs = kafka_client_kwargs(settings)
    assert kwargs["security_protocol"] == "SASL_PLAINTEXT"
    assert "ssl_context" not in kwargs
    credentials = _credentials(settings)
    assert isinstance(credentials, faust.SASLCredentials)
    assert credentials.ssl_context is None


def test_missing_tls_file_fails_at_start_naming_the_setting() -> None:
    with pytest.raises(SettingsError, match="CX_KAFKA_SSL_CAFILE: no such file"):
        load_settings(**BASE, kafka_security_protocol="SSL", kafka_ssl_cafile="/nonexistent/ca.pem")
