"""A small reader of server-sent events, as a browser's EventSource parses them."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass
class Event:
    """One event; `comment` holds a comment line (a heartbeat) instead."""

    event: str = "message"
    id: str | None = None
    data: str = ""
    comment: str | None = None

    def json(self) -> Any:
        return json.loads(self.data)


async def events(response: httpx.Response) -> AsyncIterator[Event]:
    """The events (and comment lines) of a streaming response, in order."""
    current = Event()
    fields = False
    async for line in response.aiter_lines():
        if line == "":
            if fields:
                yield current
            current, fields = Event(), False
        elif line.startswith(":"):
            yield Event(comment=line[1:].strip())
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            fields = True
            if name == "event":
                current.event = value
            elif name == "id":
                current.id = value
            elif name == "data":
                current.data = f"{current.data}\n{value}" if current.data else value
