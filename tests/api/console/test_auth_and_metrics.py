"""The JSON API's bearer auth, the console's metrics and access log, and `serve console`."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.console.auth import SESSION_COOKIE, Sessions, safe_next, session_value
from tests.api.console.harness import TOKEN, Stack

SEED = {"project_id": 123, "fine_tuning_params": {"use_llm_judge": True, "n_trials": 5}}


async def test_with_a_token_the_api_needs_it_and_forwards_it(
    make_stack: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    stack: Stack = await make_stack(auth=True)
    async with stack.client() as anonymous:
        for method, path in [
            ("GET", "/api/v1/projects"),
            ("POST", "/api/v1/fine-tuning"),
            ("GET", "/api/v1/judge-models"),
            ("GET", "/api/v1/studies/x/events"),
            ("GET", "/api/studies"),
        ]:
            response = await anonymous.request(method, path)
            assert response.status_code == 401, path
            assert response.json() == {
                "error": {"code": "UNAUTHENTICATED", "message": "missing or invalid bearer token"}
            }
            assert response.headers["WWW-Authenticate"] == "Bearer"
        # The description of the API and the health check stay open.
        assert (await anonymous.get("/api/v1/openapi.json")).status_code == 200
        assert (await anonymous.get("/healthz")).status_code == 200
    for header in [f"Bearer {TOKEN}x", f"Basic {TOKEN}", TOKEN, "Bearer not-the-token"]:
        async with stack.client(headers={"Authorization": header}) as wrong:
            assert (await wrong.get("/api/v1/projects")).status_code == 401, header

    # The console's own channels carry no token: the optimizer and the gateway (both
    # requiring it) answer only because the caller's token goes on with each call.
    async with stack.client(token=TOKEN) as http:
        assert (await http.get("/api/v1/projects")).status_code == 200
        judges = await http.get("/api/v1/judge-models")
        assert judges.status_code == 200 and judges.json()["models"]
        created = await http.post("/api/v1/fine-tuning", json=SEED)
        assert created.status_code == 201, created.text
        study_id = created.json()["study"]["study_id"]
        async with http.stream("GET", f"/api/v1/studies/{study_id}/events") as events:
            assert events.status_code == 200
        cancel = await http.post(f"/api/v1/studies/{study_id}:cancel")
        assert cancel.status_code == 200

    # Neither the token nor a wrong one reached a log line; the access log did run.
    assert "GET /api/v1/projects 401" in caplog.text
    assert "POST /api/v1/fine-tuning 201" in caplog.text
    assert TOKEN not in caplog.text and "not-the-token" not in caplog.text


async def test_with_a_token_pages_need_a_signed_in_browser(
    make_stack: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    stack: Stack = await make_stack(auth=True)
    async with stack.client() as browser:
        # Pages, the plain studies page included, send the browser to sign in first.
        for path in ["/", "/projects", "/projects/123", "/studies/s1", "/studies/s1/live?x=1"]:
            page = await browser.get(path)
            assert page.status_code == 303, path
            location = urlsplit(page.headers["Location"])
            assert location.path == "/sign-in" and parse_qs(location.query) == {"next": [path]}
        # What holds no data stays open.
        for path in ["/sign-in", "/static/console.js", "/static/console.css", "/healthz"]:
            assert (await browser.get(path)).status_code == 200, path
        form = (await browser.get("/sign-in?next=/projects/123")).text
        assert "name='next' value='/projects/123'" in form and "type='password'" in form

        # A wrong token is refused on the page, and no cookie is set.
        wrong = await browser.post("/sign-in", data={"token": "not-the-token", "next": "/"})
        assert wrong.status_code == 401 and "not this console&#x27;s access token" in wrong.text
        assert SESSION_COOKIE not in browser.cookies
        # Another site cannot sign a browser in (or out of its session's protection).
        elsewhere = await browser.post(
            "/sign-in",
            data={"token": TOKEN, "next": "/"},
            headers={"Origin": "https://evil.example"},
        )
        assert elsewhere.status_code == 403 and SESSION_COOKIE not in browser.cookies

        # The right one: a session cookie (an HMAC, not the token), back where it was going.
        signed = await browser.post("/sign-in", data={"token": TOKEN, "next": "/projects/123"})
        assert signed.status_code == 303 and signed.headers["Location"] == "/projects/123"
        set_cookie = signed.headers["Set-Cookie"]
        assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie
        assert TOKEN not in set_cookie and "Max-Age=43200" in set_cookie  # 12 hours
        session = browser.cookies[SESSION_COOKIE]
        assert Sessions().valid(session, TOKEN) is not None
        shell = await browser.get("/projects")
        assert shell.status_code == 200 and "action='/sign-out'" in shell.text
        assert (await browser.get("/")).status_code == 200  # the plain page reaches the optimizer
        # The API, the event stream included, takes the cookie; the token goes on to the services.
        assert (await browser.get("/api/v1/projects")).status_code == 200
        origin = {"Origin": stack.base}
        created = await browser.post("/api/v1/fine-tuning", json=SEED, headers=origin)
        assert created.status_code == 201, created.text
        study_id = created.json()["study"]["study_id"]
        async with browser.stream("GET", f"/api/v1/studies/{study_id}/events") as events:
            assert events.status_code == 200
        # A change asked for by another site's page, riding on the cookie, is refused.
        forged = await browser.post(
            f"/api/v1/studies/{study_id}:cancel", headers={"Origin": "https://evil.example"}
        )
        assert forged.status_code == 403 and forged.json()["error"]["code"] == "PERMISSION_DENIED"
        cancelled = await browser.post(f"/api/v1/studies/{study_id}:cancel", headers=origin)
        assert cancelled.status_code == 200

        # Signing out ends the session: the same cookie, kept and sent again, is no session.
        out = await browser.post("/sign-out", headers=origin)
        assert out.status_code == 303 and out.headers["Location"] == "/sign-in"
        assert SESSION_COOKIE not in browser.cookies
        assert (await browser.get("/api/v1/projects")).status_code == 401
    async with stack.client() as replay:
        replay.cookies.set(SESSION_COOKIE, session)
        assert (await replay.get("/api/v1/projects")).status_code == 401
    # A forged cookie is no session, nor an expired one signed with the right token.
    async with stack.client() as forger:
        forger.cookies.set(SESSION_COOKIE, session_value("guess", 3600))
        assert (await forger.get("/api/v1/projects")).status_code == 401
    async with stack.client() as late:
        late.cookies.set(SESSION_COOKIE, session_value(TOKEN, 60, now=time.time() - 120))
        assert (await late.get("/api/v1/projects")).status_code == 401
    # The services' own log lines (not the HTTP client's debug log of what it received).
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("services"))
    assert "GET /projects 303" in ours and "POST /sign-in 401" in ours
    assert TOKEN not in ours and session not in ours


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("/studies/s1/live", "/studies/s1/live"),
        ("/projects?x=1", "/projects?x=1"),
        (None, "/projects"),
        ("", "/projects"),
        ("https://evil.example/", "/projects"),
        ("//evil.example/x", "/projects"),
        ("/\\evil.example", "/projects"),
        ("/a\r\nSet-Cookie: x=1", "/projects"),
        ("/" + "a" * 600, "/projects"),
    ],
)
def test_sign_in_only_returns_to_this_console(given: str | None, expected: str) -> None:
    assert safe_next(given) == expected


async def test_without_a_token_sign_in_is_not_needed(stack: Stack) -> None:
    async with stack.client() as browser:
        page = await browser.get("/sign-in?next=/projects/123")
        assert page.status_code == 303 and page.headers["Location"] == "/projects/123"
        shell = await browser.get("/projects")
        assert shell.status_code == 200 and "sign-out" not in shell.text


async def test_without_a_token_the_api_is_open(stack: Stack) -> None:
    async with stack.client(token="anything") as http:
        assert (await http.get("/api/v1/projects")).status_code == 200
    async with stack.client() as http:
        assert (await http.get("/api/v1/judge-models")).status_code == 200


async def test_requests_are_counted_by_route_template_method_and_status(stack: Stack) -> None:
    async with stack.client() as http:
        await http.get("/api/v1/studies/secret-study-id")
        await http.get("/api/v1/studies/secret-study-id")
        await http.get("/api/v1/projects")
        await http.get("/no/such/page/id-42")
        text = (await http.get(stack.metrics_url)).text
    samples = {
        (s.labels["route"], s.labels["method"], s.labels["status"]): s.value
        for family in text_string_to_metric_families(text)
        if family.name == "loratune_console_http_requests"
        for s in family.samples
        if s.name == "loratune_console_http_requests_total"
    }
    assert samples[("/api/v1/studies/{study_id}", "GET", "404")] >= 2
    assert samples[("/api/v1/projects", "GET", "200")] >= 1
    assert samples[("unmatched", "GET", "404")] >= 1
    # No id from a path ever becomes a label.
    assert "secret-study-id" not in text and "id-42" not in text
    assert "loratune_console_http_request_duration_seconds_bucket" in text
    assert "loratune_console_event_streams" in text


def test_serve_console_serves_the_api_and_metrics_until_sigterm(tmp_path: Any) -> None:
    env = {
        **os.environ,
        "LORATUNE_OPTIMIZER_ADDRESS": "127.0.0.1:9",  # nothing there: the API says 503
        "LORATUNE_HOST": "127.0.0.1",
        "LORATUNE_LOG_FORMAT": "plain",
    }
    env.pop("LORATUNE_AUTH_TOKEN", None)
    env.pop("LORATUNE_JUDGE_ADDRESS", None)
    log = tmp_path / "console.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.cli.main",
                "serve",
                "console",
                "--port",
                "0",
                "--metrics-port",
                "0",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        ports: dict[str, int] = {}
        while time.monotonic() < deadline and len(ports) < 2:
            text = log.read_text()
            for name, pattern in [
                ("http", r"console on http://127\.0\.0\.1:(\d+)"),
                ("metrics", r"metrics on http://127\.0\.0\.1:(\d+)/metrics"),
            ]:
                if match := re.search(pattern, text):
                    ports[name] = int(match.group(1))
            assert process.poll() is None, text
            time.sleep(0.1)
        assert len(ports) == 2, log.read_text()
        base = f"http://127.0.0.1:{ports['http']}"
        response = httpx.get(f"{base}/api/v1/projects", timeout=20)
        assert response.status_code == 503 and response.json()["error"]["code"] == "UNAVAILABLE"
        metrics = httpx.get(f"http://127.0.0.1:{ports['metrics']}/metrics", timeout=10).text
        assert 'route="/api/v1/projects"' in metrics and 'status="503"' in metrics
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def test_guessing_slows_down_per_address_on_the_api_and_the_sign_in_page(
    make_stack: Any,
) -> None:
    from prometheus_client import REGISTRY

    def counted(name: str, path: str) -> float:
        return REGISTRY.get_sample_value(name, {"path": path}) or 0.0

    stack: Stack = await make_stack(auth=True)
    before = counted("loratune_auth_failures_total", "api")
    async with stack.client() as guesser:
        answers = [
            (await guesser.get("/api/v1/projects", headers={"Authorization": f"Bearer g{i}"}))
            for i in range(7)
        ]
        assert [a.status_code for a in answers[:5]] == [401] * 5  # a few free tries
        slowed = answers[6]
        assert slowed.status_code == 429 and int(slowed.headers["Retry-After"]) >= 1
        assert slowed.json()["error"]["code"] == "RESOURCE_EXHAUSTED"
        # While slowed down the address gets nothing, the right token neither.
        right = await guesser.get("/api/v1/projects", headers={"Authorization": f"Bearer {TOKEN}"})
        assert right.status_code == 429
        page = await guesser.post("/sign-in", data={"token": TOKEN, "next": "/"})
        assert page.status_code == 429 and "Retry-After" in page.headers
    assert counted("loratune_auth_failures_total", "api") - before >= 6
    assert counted("loratune_auth_throttled_total", "api") >= 1
    assert counted("loratune_auth_throttled_total", "sign_in") >= 1
