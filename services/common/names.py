"""Checks for request text: names that become paths, paths under a root, safe excerpts."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

from services.common.errors import InvalidArgument

__all__ = [
    "MAX_NAME_LENGTH",
    "MAX_PATH_LENGTH",
    "NAME_CHARACTERS",
    "NAME_PATTERN",
    "ensure_under",
    "escape_control",
    "excerpt",
    "validate_name",
]

MAX_NAME_LENGTH = 128
"""The longest name ``validate_name`` accepts by default (well under a file name's 255 bytes)."""

MAX_PATH_LENGTH = 4096
"""The longest path ``ensure_under`` accepts (Linux's ``PATH_MAX``)."""

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""Names that become paths (study names, run names, job ids), matched whole (``fullmatch``).

A letter or digit, then up to 127 letters, digits, ``.``, ``_`` or ``-``; ``validate_name``
also refuses ``..`` anywhere. So a name is one path component, never ``.``, ``..``, a
hidden file, an option (``-x``) or anything a shell or a URL would need to quote.
"""

NAME_CHARACTERS = "letters A-Z a-z, digits 0-9, '.', '_' and '-', starting with a letter or digit"
"""``NAME_PATTERN`` in words, for error messages."""

_NAME_EXCERPT_LIMIT = 32
# NAME_PATTERN without its length bound, which validate_name checks against max_length.
_NAME_CHARACTERS_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

# Line and paragraph separators: str.splitlines() and many log viewers break lines there.
_LINE_BREAKING_CATEGORIES = frozenset({"Zl", "Zp"})
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(char: str) -> str:
    """``char`` itself, or its visible escape when it is a control or line-breaking character."""
    code = ord(char)
    # C0 controls, DEL and C1 controls (these are exactly the Unicode category Cc).
    if code < 0x20 or 0x7F <= code <= 0x9F:
        return _NAMED_ESCAPES.get(char, f"\\x{code:02x}")
    if code >= 0x2028 and unicodedata.category(char) in _LINE_BREAKING_CATEGORIES:
        return f"\\u{code:04x}"
    return char


def escape_control(text: str) -> str:
    """``text`` with control characters written as visible escapes; all else untouched.

    C0 controls (NUL, ESC, ...), DEL and C1 controls become ``\\x00``-style escapes
    (``\\n``, ``\\r``, ``\\t`` for the common three), and the Unicode line and paragraph
    separators (U+2028, U+2029) ``\\u2028``-style ones. So the result is always one
    line and can drive no terminal; letters of any script (Cyrillic, CJK, ...) stay as
    they are. Backslashes are not doubled: the result is for people to read, not to
    be unescaped.
    """
    if text.isprintable():
        # The common case; isprintable() is False for every character escaped below.
        return text
    return "".join(_escape_char(char) for char in text)


def excerpt(value: str, limit: int = 64) -> str:
    """A short, escaped prefix of ``value`` for status and log messages.

    Control characters are escaped as by ``escape_control``. When the escaped text
    is longer than ``limit`` characters it is cut to at most ``limit`` (never inside
    an escape) and ends ``... (N chars)``, N being the length of the whole ``value``.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
    if len(value) <= limit and value.isprintable():
        return value
    pieces: list[str] = []
    used = 0
    for char in value:
        escaped = _escape_char(char)
        if used + len(escaped) > limit:
            return f"{''.join(pieces)}... ({len(value)} chars)"
        pieces.append(escaped)
        used += len(escaped)
    return "".join(pieces)


def validate_name(value: str, field: str, *, max_length: int = MAX_NAME_LENGTH) -> str:
    """Return ``value`` when it is a safe name of at most ``max_length`` characters.

    Safe means ``NAME_PATTERN`` (letters, digits, ``.``, ``_``, ``-``, starting with a
    letter or digit) and no ``..``: such a name can become one path component, a
    label or a file name as it is. Anything else raises ``InvalidArgument`` naming
    ``field``; the message echoes only a short escaped excerpt of the value.
    """
    if not value:
        raise InvalidArgument(f"must not be empty; use {NAME_CHARACTERS}", field=field)
    shown = excerpt(value, _NAME_EXCERPT_LIMIT)
    if len(value) > max_length:
        raise InvalidArgument(
            f'must be at most {max_length} characters, got {len(value)}: "{shown}"',
            field=field,
        )
    if _NAME_CHARACTERS_PATTERN.fullmatch(value) is None:
        raise InvalidArgument(
            f'may contain only {NAME_CHARACTERS}, got "{shown}"',
            field=field,
        )
    if ".." in value:
        raise InvalidArgument(f'must not contain "..", got "{shown}"', field=field)
    return value


def ensure_under(root: Path, path: Path, field: str) -> Path:
    """Return ``path`` resolved, when it lies inside ``root`` (or is ``root``).

    A relative ``path`` is taken relative to ``root``. Both are resolved first
    (symbolic links followed, ``..`` collapsed), so neither ``../`` nor a link out of
    the root gets past. Otherwise, and for a path with a NUL or longer than
    ``MAX_PATH_LENGTH``, raises ``InvalidArgument`` naming ``field``.
    """
    text = str(path)
    if len(text) > MAX_PATH_LENGTH:
        raise InvalidArgument(
            f"must be at most {MAX_PATH_LENGTH} characters, got {len(text)}", field=field
        )
    if "\x00" in text:
        raise InvalidArgument(f'must not contain NUL, got "{excerpt(text)}"', field=field)
    try:
        resolved_root = root.resolve()
        resolved = (resolved_root / path).resolve()
    except (OSError, RuntimeError, ValueError) as error:
        # RuntimeError: a symlink loop on Python < 3.13; OSError: too deep, unreadable.
        raise InvalidArgument(
            f'cannot be resolved ({type(error).__name__}): "{excerpt(text)}"', field=field
        ) from error
    if not resolved.is_relative_to(resolved_root):
        raise InvalidArgument(
            f'must be inside {excerpt(str(resolved_root), 256)}, got "{excerpt(text)}"',
            field=field,
        )
    return resolved
