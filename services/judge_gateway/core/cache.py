"""A cache of valid judgments: in-memory LRU, optionally persisted to SQLite."""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheKey:
    """Everything that can change a judgment. Holds texts and settings, never a secret."""

    provider_type: str
    model_name: str
    api_version: str
    rubric_version: str
    prompt_version: str
    schema_version: str
    prompt: str
    candidate: str
    reference: str
    temperature: float
    max_output_tokens: int
    # Hashed once: a missed key is looked up, then written.
    _digest: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "_digest"}
        payload = json.dumps(values, sort_keys=True, ensure_ascii=False)
        object.__setattr__(self, "_digest", hashlib.sha256(payload.encode("utf-8")).hexdigest())

    def digest(self) -> str:
        """A stable hash of every field."""
        return self._digest


@dataclass(frozen=True)
class CachedJudgment:
    """A stored valid judgment."""

    score: float
    reasoning: str
    provider_model: str


class JudgmentCache:
    """LRU of `max_entries` judgments; with `path`, also a SQLite table that survives restarts.

    Only valid judgments are ever stored (the gateway never puts a failure here).
    """

    def __init__(self, max_entries: int = 100_000, path: Path | None = None) -> None:
        self._max = max_entries
        self._memory: OrderedDict[str, CachedJudgment] = OrderedDict()
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS judgments (key TEXT PRIMARY KEY, score REAL NOT NULL,"
                " reasoning TEXT NOT NULL, provider_model TEXT NOT NULL)"
            )
            logger.info("judgment cache persisted at %s", path)

    def get(self, key: CacheKey) -> CachedJudgment | None:
        """The stored judgment for `key`, or None."""
        digest = key.digest()
        with self._lock:
            hit = self._memory.get(digest)
            if hit is not None:
                self._memory.move_to_end(digest)
                return hit
            if self._db is None:
                return None
            row = self._db.execute(
                "SELECT score, reasoning, provider_model FROM judgments WHERE key = ?", (digest,)
            ).fetchone()
            if row is None:
                return None
            found = CachedJudgment(float(row[0]), str(row[1]), str(row[2]))
            self._remember(digest, found)
            return found

    def put(self, key: CacheKey, judgment: CachedJudgment) -> None:
        """Stores a valid judgment."""
        digest = key.digest()
        with self._lock:
            self._remember(digest, judgment)
            if self._db is not None:
                self._db.execute(
                    "INSERT OR REPLACE INTO judgments VALUES (?, ?, ?, ?)",
                    (digest, judgment.score, judgment.reasoning, judgment.provider_model),
                )

    def _remember(self, digest: str, judgment: CachedJudgment) -> None:
        if self._max <= 0:
            return
        self._memory[digest] = judgment
        self._memory.move_to_end(digest)
        while len(self._memory) > self._max:
            self._memory.popitem(last=False)

    def __len__(self) -> int:
        return len(self._memory)

    def close(self) -> None:
        """Closes the SQLite file."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
