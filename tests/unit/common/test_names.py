"""Names that become paths, paths under a root, and escaped excerpts of request text."""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.errors import InvalidArgument
from services.common.names import (
    NAME_PATTERN,
    ensure_under,
    escape_control,
    excerpt,
    validate_name,
)

CONTROL = "\x00\x01\x07\x08\t\n\x0b\x0c\r\x1b\x1f\x7f\x80\x85\x9b\x9f\u2028\u2029"


def raw_controls(text: str) -> list[str]:
    """Characters of ``text`` that a terminal or a line splitter acts on."""
    return [c for c in text if unicodedata.category(c) in ("Cc", "Zl", "Zp")]


@pytest.mark.parametrize(
    "name",
    ["a", "Z", "0", "study-1", "qwen3_0.6b.lora", "A" * 128, "trial.7-a_b", "x.y"],
)
def test_valid_names_pass_unchanged(name: str) -> None:
    assert validate_name(name, "study_name") == name


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "must not be empty"),
        ("../x", "may contain only"),
        ("..", "may contain only"),
        ("a..b", 'must not contain ".."'),
        ("x..", 'must not contain ".."'),
        (".hidden", "may contain only"),
        ("-rf", "may contain only"),
        ("_x", "may contain only"),
        ("a/b", "may contain only"),
        ("a\\b", "may contain only"),
        ("a b", "may contain only"),
        ("run\n", "may contain only"),
        ("имя", "may contain only"),
        ("a" * 129, "must be at most 128 characters, got 129"),
    ],
)
def test_invalid_names_are_refused_naming_the_field(name: str, why: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_name(name, "job_id")
    assert caught.value.field == "job_id"
    assert str(caught.value).startswith("job_id: ")
    assert why in caught.value.message


def test_the_message_names_the_allowed_characters_and_echoes_a_short_escaped_prefix() -> None:
    bad = "evil\n2026-01-01 INFO forged\x1b[31m" + "x" * 5000
    with pytest.raises(InvalidArgument) as caught:
        validate_name(bad, "run_name", max_length=10_000)
    message = caught.value.message
    assert "A-Z" in message and "0-9" in message and "'-'" in message
    assert "evil\\n2026" in message and "(5032 chars)" in message
    assert len(message) < 250
    assert not raw_controls(message)


def test_max_length_is_configurable() -> None:
    assert validate_name("a" * 200, "job_id", max_length=200) == "a" * 200
    with pytest.raises(InvalidArgument, match="at most 5 characters"):
        validate_name("abcdef", "job_id", max_length=5)


def test_excerpt_keeps_short_text_and_cuts_long_text_with_its_length() -> None:
    assert excerpt("claude") == "claude"
    assert excerpt("Привет, мир") == "Привет, мир"
    assert excerpt("a" * 64) == "a" * 64
    assert excerpt("a" * 20_000) == "a" * 64 + "... (20000 chars)"
    assert excerpt("abcdef", limit=3) == "abc... (6 chars)"


def test_excerpt_escapes_and_never_cuts_inside_an_escape() -> None:
    assert excerpt("a\x00b\x1bc\nd") == "a\\x00b\\x1bc\\nd"
    # "ab" fits in 4, the 4-character escape of NUL would not.
    assert excerpt("ab\x00cd", limit=4) == "ab... (5 chars)"


def test_escape_control_escapes_controls_and_line_breaks_only() -> None:
    assert escape_control("a\nb\rc\td") == "a\\nb\\rc\\td"
    assert escape_control("\x00\x1b[31m\x7f") == "\\x00\\x1b[31m\\x7f"
    assert escape_control("\x85\x9b") == "\\x85\\x9b"
    assert escape_control("a\u2028b\u2029") == "a\\u2028b\\u2029"
    text = "Оплата аренды — 500 € 日本 😀 \\x00 'quoted' \"x\""
    assert escape_control(text) == text


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8")) | st.text(alphabet=CONTROL + "ab\\"))
def test_escaped_text_has_no_control_characters_and_is_one_line(text: str) -> None:
    escaped = escape_control(text)
    assert not raw_controls(escaped)
    assert len(escaped.splitlines()) <= 1
    # Text without such characters is left exactly as it is.
    if not raw_controls(text):
        assert escaped == text


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8")), st.integers(min_value=1, max_value=100))
def test_excerpts_are_bounded_escaped_prefixes(text: str, limit: int) -> None:
    shown = excerpt(text, limit)
    assert not raw_controls(shown)
    if shown.endswith(f"... ({len(text)} chars)") and escape_control(text) != shown:
        head = shown[: -len(f"... ({len(text)} chars)")]
        assert len(head) <= limit
        assert escape_control(text).startswith(head)
    else:
        assert shown == escape_control(text) and len(shown) <= limit


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_random_text_never_passes_as_an_escaping_name(text: str) -> None:
    try:
        name = validate_name(text, "name")
    except InvalidArgument as error:
        assert error.field == "name"
        assert not raw_controls(str(error))
        return
    assert NAME_PATTERN.fullmatch(name) and ".." not in name
    assert Path(name).name == name and name not in (".", "..")
    assert (Path("/root") / name).resolve().parent == Path("/root")


def test_ensure_under_accepts_paths_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    root.mkdir()
    assert ensure_under(root, root / "a" / "b", "output_dir") == (root / "a" / "b").resolve()
    assert ensure_under(root, Path("a/b"), "output_dir") == (root / "a" / "b").resolve()
    assert ensure_under(root, root, "output_dir") == root.resolve()
    assert ensure_under(root, root / "a" / ".." / "c", "output_dir") == root / "c"


@pytest.mark.parametrize("path", ["/etc/x", "../../etc", "..", "a/../../x", "/", "runs-sibling"])
def test_ensure_under_refuses_paths_outside_naming_the_field(tmp_path: Path, path: str) -> None:
    root = tmp_path / "runs"
    root.mkdir()
    outside = Path(path) if path != "runs-sibling" else tmp_path / "runs-sibling" / "x"
    with pytest.raises(InvalidArgument) as caught:
        ensure_under(root, outside, "output_dir")
    assert caught.value.field == "output_dir"
    assert "must be inside" in caught.value.message


def test_ensure_under_follows_symlinks_out_of_the_root(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    root.mkdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", root / "link")
    with pytest.raises(InvalidArgument, match="must be inside"):
        ensure_under(root, root / "link" / "x", "output_dir")


def test_ensure_under_refuses_nul_and_huge_paths(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="NUL") as caught:
        ensure_under(tmp_path, Path("a\x00b"), "output_dir")
    assert not raw_controls(str(caught.value))
    with pytest.raises(InvalidArgument, match="at most 4096") as caught:
        ensure_under(tmp_path, Path("a" * 5000), "output_dir")
    assert caught.value.field == "output_dir"
