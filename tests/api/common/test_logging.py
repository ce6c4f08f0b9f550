"""configure_logging: plain and JSON lines, idempotence, and redaction of registered secrets."""

from __future__ import annotations

import io
import json
import logging
import sys
import uuid

import pytest

from services.common.logging import configure_logging, register_secret


def ours(root: logging.Logger) -> list[logging.Handler]:
    return [h for h in root.handlers if type(h).__name__ == "_LoratuneHandler"]


def test_json_lines_are_valid_json_with_the_fields(
    root_logging: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("json", "DEBUG")
    log = logging.getLogger("loratune.test")
    log.debug("debug %s", "shown")
    log.info("with extra", extra={"study_id": "s-1"})
    try:
        raise ValueError("broken")
    except ValueError:
        log.exception("it failed")
    lines = capsys.readouterr().err.splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["message"] for r in records] == ["debug shown", "with extra", "it failed"]
    assert {"time", "level", "logger", "message"} <= records[0].keys()
    assert records[0]["level"] == "DEBUG"
    assert records[0]["logger"] == "loratune.test"
    assert records[1]["study_id"] == "s-1"
    assert "exc_info" not in records[1]
    assert "ValueError: broken" in records[2]["exc_info"]
    assert records[2]["exc_info"].startswith("Traceback")


def test_configuring_twice_keeps_one_handler_and_applies_the_new_settings(
    root_logging: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("json", "INFO")
    configure_logging("plain", "WARNING")
    assert len(ours(root_logging)) == 1
    logging.getLogger("loratune.test").info("hidden")
    logging.getLogger("loratune.test").warning("plain text")
    err = capsys.readouterr().err
    assert "hidden" not in err
    assert err.strip().endswith("WARNING loratune.test: plain text")
    with pytest.raises(json.JSONDecodeError):
        json.loads(err)


def test_registered_secrets_are_redacted_from_messages_arguments_and_tracebacks(
    root_logging: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = f"secret-{uuid.uuid4().hex}"
    longer = f"{secret}-and-more"
    register_secret(secret)
    register_secret(longer)
    register_secret("")  # ignored: it would match everywhere
    configure_logging("json", "INFO")
    log = logging.getLogger("loratune.test")
    log.info("key=%s", secret)
    log.info(f"inline {longer}")
    try:
        raise RuntimeError(f"provider said no to {secret}")
    except RuntimeError:
        log.exception("call failed")
    err = capsys.readouterr().err
    assert secret not in err
    records = [json.loads(line) for line in err.splitlines()]
    assert records[0]["message"] == "key=***"
    assert records[1]["message"] == "inline ***"
    assert "provider said no to ***" in records[2]["exc_info"]


def test_plain_format_is_redacted_too(
    root_logging: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = f"plain-{uuid.uuid4().hex}"
    register_secret(secret)
    configure_logging("plain", "INFO")
    logging.getLogger("loratune.test").warning("token %s", secret)
    assert capsys.readouterr().err.strip().endswith("token ***")


def test_an_unknown_format_is_refused(root_logging: logging.Logger) -> None:
    with pytest.raises(ValueError, match="plain"):
        configure_logging("xml")


def test_reconfiguring_follows_a_replaced_stderr(
    root_logging: logging.Logger,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gone = io.StringIO()
    monkeypatch.setattr(sys, "stderr", gone)
    configure_logging("plain", "INFO")
    gone.close()  # like a finished test's capture
    monkeypatch.undo()
    configure_logging("plain", "INFO")
    logging.getLogger("loratune.test").warning("still logged")
    assert capsys.readouterr().err.strip().endswith("still logged")
    assert len(ours(root_logging)) == 1
