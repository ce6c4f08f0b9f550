"""The fake servers themselves: scripting, recording, concurrency, sync use."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx

from tests.fakes.gigachat import DEFAULT_CREDENTIALS, FakeGigaChat
from tests.fakes.http import DEFAULT_JUDGMENT_TEXT, RecordedRequest, Reply
from tests.fakes.openai import FakeOpenAI


def _chat(model: str = "m") -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


def test_script_then_default_responder_from_sync_code() -> None:
    with FakeOpenAI() as fake, httpx.Client(base_url=fake.url + "/") as client:
        fake.script(Reply.error(503), Reply.json_text("first"))
        statuses = [client.post("chat/completions", json=_chat()).status_code for _ in range(2)]
        third = client.post("chat/completions", json=_chat()).json()

        assert statuses == [503, 200]
        assert third["choices"][0]["message"]["content"] == DEFAULT_JUDGMENT_TEXT
        assert [r.body["model"] for r in fake.requests] == ["m", "m", "m"]

        fake.responder = lambda request: Reply(status=418, body={"teapot": True})
        assert client.post("chat/completions", json=_chat()).status_code == 418

        fake.reset()
        assert fake.requests == []
        assert client.post("chat/completions", json=_chat()).status_code == 200


def test_latency_applies_to_every_reply() -> None:
    with FakeOpenAI(latency=0.2) as fake, httpx.Client() as client:
        started = time.monotonic()
        client.get(f"{fake.url}/models")
        assert time.monotonic() - started >= 0.2


async def test_two_hundred_concurrent_connections() -> None:
    with FakeOpenAI() as fake:
        # Every reply waits until all 200 requests are in the server at once.
        everyone = threading.Barrier(200, timeout=20)

        def respond(request: RecordedRequest) -> Reply:
            everyone.wait()
            return fake.default_reply(request)

        fake.responder = respond
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=fake.url + "/", limits=limits) as client:
            responses = await asyncio.gather(
                *(client.post("chat/completions", json=_chat()) for _ in range(200))
            )

        assert [r.status_code for r in responses] == [200] * 200
        assert fake.peak_concurrency == 200


def test_gigachat_tokens_expire_and_are_checked() -> None:
    with FakeGigaChat() as fake, httpx.Client() as client:
        oauth = client.post(
            fake.auth_url,
            headers={
                "Authorization": f"Basic {DEFAULT_CREDENTIALS}",
                "RqUID": "6f0b1291-c7f3-43c6-bb2e-9f3efb2dc98e",
            },
            data={"scope": "GIGACHAT_API_PERS"},
        ).json()
        assert oauth["expires_at"] > time.time() * 1000 + 1700_000
        bearer = {"Authorization": f"Bearer {oauth['access_token']}"}

        models = client.get(f"{fake.url}/models", headers=bearer)
        assert [m["id"] for m in models.json()["data"]] == list(fake.models)
        unknown = client.post(
            f"{fake.url}/chat/completions", headers=bearer, json=_chat("GigaChat-0")
        )
        assert (unknown.status_code, unknown.json()) == (
            404,
            {"status": 404, "message": "No such model"},
        )

        fake.expire_tokens()
        assert client.get(f"{fake.url}/models", headers=bearer).status_code == 401
        assert fake.token_requests == 1
