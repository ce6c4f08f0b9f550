"""Builds a judge provider from its type and already-resolved settings."""

from __future__ import annotations

from collections.abc import Mapping

from services.judge_gateway.core.providers.base import JudgeProvider

PROVIDER_TYPES = ("gemini", "gigachat", "openai")

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


def build_provider(provider_type: str, options: Mapping[str, str]) -> JudgeProvider:
    """A provider of `provider_type` configured from `options`.

    gemini: `api_key` (required), `base_url`, `api_version`.
    gigachat: `credentials` (required), `scope`, `base_url`, `auth_url`,
    `verify_ssl_certs` ("true" / "false"), `ca_bundle_file`.
    openai: `base_url` (required), `api_key`.
    Empty values count as absent. Raises ValueError for an unknown type, a missing
    required option or an unreadable one; the message names the option, never its value.
    """
    # Imported here so that a gateway configured for one provider needs no other's SDK.
    if provider_type == "gemini":
        from services.judge_gateway.core.providers.gemini import GeminiProvider

        return GeminiProvider(
            _required(options, "api_key", provider_type),
            base_url=_optional(options, "base_url"),
            api_version=_optional(options, "api_version") or "v1beta",
        )
    if provider_type == "gigachat":
        from services.judge_gateway.core.providers.gigachat import (
            DEFAULT_AUTH_URL,
            DEFAULT_BASE_URL,
            DEFAULT_SCOPE,
            GigaChatProvider,
        )

        return GigaChatProvider(
            _required(options, "credentials", provider_type),
            scope=_optional(options, "scope") or DEFAULT_SCOPE,
            base_url=_optional(options, "base_url") or DEFAULT_BASE_URL,
            auth_url=_optional(options, "auth_url") or DEFAULT_AUTH_URL,
            verify_ssl_certs=_flag(options, "verify_ssl_certs", default=True),
            ca_bundle_file=_optional(options, "ca_bundle_file"),
        )
    if provider_type == "openai":
        from services.judge_gateway.core.providers.openai_compat import (
            OpenAICompatibleProvider,
        )

        return OpenAICompatibleProvider(
            _required(options, "base_url", provider_type),
            api_key=_optional(options, "api_key"),
        )
    raise ValueError(
        f"unknown judge provider type {provider_type!r}; expected one of {PROVIDER_TYPES}"
    )


def _optional(options: Mapping[str, str], name: str) -> str | None:
    value = options.get(name)
    return value.strip() or None if value is not None else None


def _required(options: Mapping[str, str], name: str, provider_type: str) -> str:
    value = _optional(options, name)
    if value is None:
        raise ValueError(f"judge provider {provider_type!r} needs the option {name!r}")
    return value


def _flag(options: Mapping[str, str], name: str, *, default: bool) -> bool:
    value = _optional(options, name)
    if value is None:
        return default
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ValueError(f"option {name!r} must be true or false")
