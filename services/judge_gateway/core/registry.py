"""The registry of judge models: ids -> provider, model and options, and their credentials."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.names import excerpt

PROVIDER_TYPES = ("gemini", "gigachat", "openai")
DEFAULT_CONCURRENCY = {"gemini": 8, "gigachat": 2, "openai": 4}
GEMINI_API_VERSION = "v1beta"
GIGACHAT_BASE_URL = "https://gigachat.devices.sberbank.ru/api/v1"
GIGACHAT_AUTH_URL = "https://ngw.devices.sberbank.ru:9443/api/v2/oauth"


@dataclass(frozen=True)
class JudgeModelSpec:
    """One judge model: its provider, the provider's model name and connection options.

    `options` hold non-secret settings; `secret_env` maps an option to the environment
    variable that holds its secret value (resolved once at start-up, never logged).
    """

    id: str
    provider_type: str
    model_name: str
    options: Mapping[str, str] = field(default_factory=dict)
    secret_env: Mapping[str, str] = field(default_factory=dict)
    max_concurrency: int = 0  # 0 = the provider type's default
    max_output_tokens: int = 1024
    temperature: float = 0.0

    @property
    def connection_key(self) -> tuple[str, ...]:
        """Models with the same key share one client, one breaker and one concurrency cap."""
        return (
            self.provider_type,
            *(f"{k}={v}" for k, v in sorted(self.options.items())),
            *sorted(self.secret_env.values()),
        )


@dataclass(frozen=True)
class ResolvedModel:
    """A spec with its secrets read from the environment, ready to build a provider."""

    spec: JudgeModelSpec
    secrets: Mapping[str, str]
    missing: tuple[str, ...]  # names of required variables that are unset

    @property
    def available(self) -> bool:
        """Whether every credential is present."""
        return not self.missing

    def provider_options(self) -> dict[str, str]:
        """Options and secrets together, as the provider factory takes them."""
        return {**self.spec.options, **self.secrets}


def _env(environ: Mapping[str, str], name: str, default: str = "") -> str:
    value = environ.get(name, "").strip()
    return value or default


def builtin_specs(environ: Mapping[str, str]) -> list[JudgeModelSpec]:
    """`gemini` and `gigachat`, configured from the providers' own variables."""
    gemini_options = {"api_version": GEMINI_API_VERSION}
    if base := _env(environ, "GOOGLE_GEMINI_BASE_URL"):
        gemini_options["base_url"] = base
    gigachat_options = {
        "scope": _env(environ, "GIGACHAT_SCOPE", "GIGACHAT_API_PERS"),
        "base_url": _env(environ, "GIGACHAT_BASE_URL", GIGACHAT_BASE_URL),
        "auth_url": _env(environ, "GIGACHAT_AUTH_URL", GIGACHAT_AUTH_URL),
        "verify_ssl_certs": _env(environ, "GIGACHAT_VERIFY_SSL_CERTS", "true").lower(),
    }
    if bundle := _env(environ, "GIGACHAT_CA_BUNDLE_FILE"):
        gigachat_options["ca_bundle_file"] = bundle
    return [
        JudgeModelSpec(
            id="gemini",
            provider_type="gemini",
            model_name=_env(environ, "GEMINI_MODEL", "gemini-2.5-flash"),
            options=gemini_options,
            secret_env={"api_key": "GEMINI_API_KEY"},
        ),
        JudgeModelSpec(
            id="gigachat",
            provider_type="gigachat",
            model_name=_env(environ, "GIGACHAT_MODEL", "GigaChat-2-Max"),
            options=gigachat_options,
            secret_env={"credentials": "GIGACHAT_CREDENTIALS"},
        ),
    ]


def _spec_from_entry(
    entry: Any, index: int, builtins: Mapping[str, JudgeModelSpec]
) -> JudgeModelSpec:
    where = f"LORATUNE_JUDGE_MODELS: models[{index}]"
    if not isinstance(entry, dict):
        raise InvalidArgument(f"{where} must be a mapping")
    model_id = str(entry.get("id", "")).strip()
    provider = str(entry.get("provider", "")).strip()
    model = str(entry.get("model", "")).strip()
    if not model_id or not model:
        raise InvalidArgument(f"{where} needs 'id' and 'model'")
    if provider not in PROVIDER_TYPES:
        raise InvalidArgument(f"{where}: provider must be one of {', '.join(PROVIDER_TYPES)}")
    # A gemini / gigachat entry inherits the built-in connection settings of its provider.
    base = builtins.get(provider)
    options = dict(base.options) if base else {}
    secret_env = dict(base.secret_env) if base else {}
    for key in (
        "base_url",
        "api_version",
        "scope",
        "auth_url",
        "verify_ssl_certs",
        "ca_bundle_file",
    ):
        if key in entry:
            options[key] = str(entry[key])
    if "api_key_env" in entry:
        secret_env["api_key"] = str(entry["api_key_env"])
    if "credentials_env" in entry:
        secret_env["credentials"] = str(entry["credentials_env"])
    if provider == "openai" and "base_url" not in options:
        raise InvalidArgument(f"{where}: an openai-compatible judge needs 'base_url'")
    return JudgeModelSpec(
        id=model_id,
        provider_type=provider,
        model_name=model,
        options=options,
        secret_env=secret_env,
        max_concurrency=int(entry.get("max_concurrency", 0)),
        max_output_tokens=int(entry.get("max_output_tokens", 1024)),
        temperature=float(entry.get("temperature", 0.0)),
    )


def load_config_file(path: Path) -> tuple[list[Any], str]:
    """The `models` list and optional `default` id of a YAML or JSON registry file."""
    text = path.read_text(encoding="utf-8")
    data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    if isinstance(data, list):
        return data, ""
    if not isinstance(data, dict) or not isinstance(data.get("models", []), list):
        raise InvalidArgument(f"LORATUNE_JUDGE_MODELS: {path} must hold a 'models' list")
    return list(data.get("models", [])), str(data.get("default", "") or "")


class JudgeRegistry:
    """Judge models by id, with credentials resolved from the environment once."""

    def __init__(self, models: list[ResolvedModel], default_id: str) -> None:
        self._models = {m.spec.id: m for m in models}
        if default_id not in self._models:
            raise InvalidArgument(
                f"LORATUNE_JUDGE_DEFAULT: '{default_id}' is not a registered judge model "
                f"(available: {', '.join(self._models)})"
            )
        self.default_id = default_id

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str], config_path: Path | None = None, default_id: str = ""
    ) -> JudgeRegistry:
        """The built-in models, plus those of the config file, with secrets from `environ`."""
        builtins = {s.id: s for s in builtin_specs(environ)}
        specs = dict(builtins)
        file_default = ""
        if config_path is not None:
            entries, file_default = load_config_file(config_path)
            for i, entry in enumerate(entries):
                spec = _spec_from_entry(entry, i, builtins)
                specs[spec.id] = spec
                if isinstance(entry, dict) and entry.get("default"):
                    file_default = spec.id
        resolved = []
        for spec in specs.values():
            secrets = {opt: _env(environ, var) for opt, var in spec.secret_env.items()}
            missing = tuple(var for opt, var in spec.secret_env.items() if not secrets[opt])
            resolved.append(ResolvedModel(spec, {k: v for k, v in secrets.items() if v}, missing))
        return cls(resolved, default_id or file_default or "gemini")

    def models(self) -> list[ResolvedModel]:
        """Every model, in registration order."""
        return list(self._models.values())

    def secrets(self) -> list[str]:
        """Every secret value in use (for log redaction)."""
        return [v for m in self._models.values() for v in m.secrets.values()]

    def resolve(self, model_id: str) -> ResolvedModel:
        """The model for `model_id` ("" = the default); NOT_FOUND or FAILED_PRECONDITION.

        The NOT_FOUND message echoes only an escaped excerpt of the id the caller sent.
        """
        key = model_id or self.default_id
        model = self._models.get(key)
        if model is None:
            raise NotFound(
                f"LLM Judge model not found: '{excerpt(key)}' "
                f"(available: {', '.join(self._models)})"
            )
        if not model.available:
            raise FailedPrecondition(
                f"judge model '{key}' has no credentials: set {', '.join(model.missing)}"
            )
        return model
