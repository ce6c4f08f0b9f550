"""CommonSettings from LORATUNE_* variables: parsing, defaults, TLS pairing, secret hiding."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.common.config import CommonSettings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("LORATUNE_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_defaults() -> None:
    settings = CommonSettings()
    assert settings.log_format == "plain"
    assert settings.log_level == "INFO"
    assert settings.reflection is True
    assert settings.auth_token is None
    assert settings.tls_cert is settings.tls_key is settings.tls_client_ca is None
    assert settings.grace_period_seconds == 10.0
    assert settings.max_message_bytes == 64 * 2**20
    assert settings.host == "0.0.0.0"
    assert not settings.tls_enabled


def test_values_come_from_loratune_variables(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("LORATUNE_REFLECTION", "false")
    clean_env.setenv("LORATUNE_LOG_FORMAT", "JSON")
    clean_env.setenv("LORATUNE_LOG_LEVEL", "debug")
    clean_env.setenv("LORATUNE_GRACE_PERIOD_SECONDS", "2.5")
    clean_env.setenv("LORATUNE_MAX_MESSAGE_BYTES", "1024")
    clean_env.setenv("LORATUNE_HOST", "127.0.0.1")
    clean_env.setenv("LORATUNE_TLS_CERT", "/certs/tls.crt")
    clean_env.setenv("LORATUNE_TLS_KEY", "/certs/tls.key")
    clean_env.setenv("LORATUNE_TLS_CLIENT_CA", "/certs/ca.crt")
    clean_env.setenv("LORATUNE_STORAGE_URL", "sqlite:///x.db")  # another component's: ignored
    clean_env.setenv("LORATUNE_AUTH_TOKEN", "s3cr3t-value")
    settings = CommonSettings()
    assert settings.reflection is False
    assert settings.log_format == "json"
    assert settings.log_level == "DEBUG"
    assert settings.grace_period_seconds == 2.5
    assert settings.max_message_bytes == 1024
    assert settings.host == "127.0.0.1"
    assert settings.tls_cert == Path("/certs/tls.crt")
    assert settings.mtls_enabled
    assert settings.auth_token is not None
    assert settings.auth_token.get_secret_value() == "s3cr3t-value"
    assert "s3cr3t-value" not in repr(settings)
    assert "s3cr3t-value" not in str(settings.model_dump())


def test_empty_variables_count_as_unset(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("LORATUNE_AUTH_TOKEN", "")
    clean_env.setenv("LORATUNE_TLS_CERT", "")
    assert CommonSettings().auth_token is None
    assert CommonSettings().tls_cert is None


def test_a_cert_without_its_key_names_both_variables(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("LORATUNE_TLS_CERT", "/certs/tls.crt")
    clean_env.setenv("LORATUNE_AUTH_TOKEN", "never-in-the-error")
    with pytest.raises(ValidationError) as caught:
        CommonSettings()
    assert "LORATUNE_TLS_KEY" in str(caught.value)
    assert "LORATUNE_TLS_CERT" in str(caught.value)
    assert "never-in-the-error" not in str(caught.value)


def test_a_key_without_its_cert_is_refused(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("LORATUNE_TLS_KEY", "/certs/tls.key")
    with pytest.raises(ValidationError, match="LORATUNE_TLS_CERT"):
        CommonSettings()


def test_a_client_ca_needs_the_server_certificate(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("LORATUNE_TLS_CLIENT_CA", "/certs/ca.crt")
    with pytest.raises(ValidationError, match="LORATUNE_TLS_CLIENT_CA"):
        CommonSettings()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LORATUNE_LOG_FORMAT", "xml"),
        ("LORATUNE_LOG_LEVEL", "chatty"),
        ("LORATUNE_REFLECTION", "maybe"),
        ("LORATUNE_GRACE_PERIOD_SECONDS", "-1"),
    ],
)
def test_bad_values_are_refused(clean_env: pytest.MonkeyPatch, name: str, value: str) -> None:
    clean_env.setenv(name, value)
    with pytest.raises(ValidationError):
        CommonSettings()
