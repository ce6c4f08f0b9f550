"""The JSON API over real HTTP: the seed's request, projects, studies, judge models, events.

Every response is checked against the console's own OpenAPI document.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import jsonschema
from prometheus_client import REGISTRY

from tests.api.console.harness import OpenApi, Stack
from tests.api.console.sse import Event, events

# The seed's request, byte for byte as teams send it.
SEED = (
    '{"project_id": 123, "fine_tuning_params": {"use_llm_judge": true, '
    '"judge_model_id": "gemini", "base_model_name": "Qwen/Qwen3-0.6B", "n_trials": 20}}'
)
JSON = {"Content-Type": "application/json"}


async def openapi(stack: Stack) -> OpenApi:
    async with stack.client() as http:
        document = (await http.get("/api/v1/openapi.json")).json()
    assert document["openapi"] == "3.1.0"
    for schema in document["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)
    return OpenApi(document)


async def test_the_seed_request_starts_a_study_that_exists(stack: Stack) -> None:
    spec = await openapi(stack)
    spec.check_request("/api/v1/fine-tuning", json.loads(SEED))
    async with stack.client() as http:
        created = await http.post("/api/v1/fine-tuning", content=SEED, headers=JSON)
        assert created.status_code == 201, created.text
        study = spec.check("/api/v1/fine-tuning", "post", created)["study"]
        study_id = study["study_id"]
        assert created.headers["Location"] == f"/api/v1/studies/{study_id}"
        assert study["project_id"] == "123" and study["objective_name"] == "combined"
        assert study["fine_tuning_params"] == {
            "use_llm_judge": True,
            "judge_model_id": "gemini",
            "base_model_name": "Qwen/Qwen3-0.6B",
            "n_trials": 20,
            "time_budget_seconds": 0,  # none
            "base_model_names": [],
        }
        assert study["dataset"]["task_type"] == "TASK_TYPE_GENERATION"

        # The study exists: in the optimizer, and through the API.
        assert (await stack.optimizer.get_study(study_id)).record.spec.project_id == 123
        one = spec.check(
            "/api/v1/studies/{study_id}", "get", await http.get(created.headers["Location"])
        )
        assert one["study"]["study_id"] == study_id and isinstance(one["trials"], list)
        mine = await http.get("/api/v1/studies", params={"project_id": 123})
        listed = spec.check("/api/v1/studies", "get", mine)["studies"]
        assert [s["study_id"] for s in listed] == [study_id]
        everything = spec.check("/api/v1/studies", "get", await http.get("/api/v1/studies"))
        assert [s["study_id"] for s in everything["studies"]] == [study_id]
        other = await http.get("/api/v1/studies", params={"project_id": 124})
        assert spec.check("/api/v1/studies", "get", other) == {"studies": []}

        cancel = await http.post(f"/api/v1/studies/{study_id}:cancel")
        cancelled = spec.check("/api/v1/studies/{study_id}:cancel", "post", cancel)
        assert cancelled["study"]["state"] == "STUDY_STATE_CANCELLED"
        again = await http.post(f"/api/v1/studies/{study_id}:cancel")
        assert again.status_code == 409
        error = spec.check("/api/v1/studies/{study_id}:cancel", "post", again)["error"]
        assert error["code"] == "FAILED_PRECONDITION" and "already cancelled" in error["message"]


async def test_projects_and_judge_models_are_listed(stack: Stack) -> None:
    spec = await openapi(stack)
    async with stack.client() as http:
        projects = spec.check("/api/v1/projects", "get", await http.get("/api/v1/projects"))
        assert [(p["project_id"], p["name"]) for p in projects["projects"]] == [
            ("123", "support"),
            ("124", "payments"),
        ]
        assert projects["projects_file_error"] == ""
        one = await http.get("/api/v1/projects/124")
        project = spec.check("/api/v1/projects/{project_id}", "get", one)["project"]
        assert project["base_model_name"] == "org/model" and project["n_trials"] == 5
        assert project["dataset"]["task_type"] == "TASK_TYPE_CLASSIFICATION"

        judges = await http.get("/api/v1/judge-models")
        models = {m["id"]: m for m in spec.check("/api/v1/judge-models", "get", judges)["models"]}
    assert models["gemini"]["available"] and models["gemini"]["is_default"]
    assert not models["gigachat"]["available"] and not models["gigachat"]["is_default"]
    assert models["gigachat"]["missing_variables"] == ["GIGACHAT_CREDENTIALS"]


async def test_a_studys_events_stream_to_its_end(stack: Stack) -> None:
    spec = await openapi(stack)
    stack.trainers.run.set()  # the trials run through
    async with stack.client() as http:
        created = await http.post(
            "/api/v1/fine-tuning", json={"project_id": 124, "study_name": "events"}
        )
        assert created.status_code == 201, created.text
        received: list[Event] = []
        async with http.stream("GET", "/api/v1/studies/events/events") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["cache-control"] == "no-cache"
            async for event in events(response):
                if event.comment is None:
                    received.append(event)
    # The stream ended by itself with the study, after its last event.
    kinds = [e.event for e in received]
    assert kinds[-1] == "study_finished" and kinds.count("study_finished") == 1
    assert kinds.count("trial_started") == 5 and kinds.count("trial_finished") == 5
    assert [e.id for e in received] == [str(n) for n in range(1, len(received) + 1)]
    for event in received:
        data = event.json()
        spec.check_event("/api/v1/studies/{study_id}/events", data)
        assert data["study_id"] == "events" and event.event in data
    finished = received[-1].json()["study_finished"]["study"]
    assert finished["state"] == "STUDY_STATE_COMPLETED"
    assert finished["trials_complete"] + finished["trials_pruned"] == 5
    # Its trials, a page at a time, as the study page fetches them; a bad page is a 400.
    async with stack.client() as http:
        numbers, query = [], "?page_size=2"
        while True:
            page = spec.check(
                "/api/v1/studies/{study_id}",
                "get",
                await http.get(f"/api/v1/studies/events{query}"),
            )
            numbers.append([t["number"] for t in page["trials"]])
            if not page.get("next_page_token"):
                break
            query = f"?page_size=2&page_token={page['next_page_token']}"
        assert numbers == [[0, 1], [2, 3], [4]]
        for bad, field in (("?page_size=x", "page_size"), ("?page_token=nope", "page_token")):
            refused = await http.get(f"/api/v1/studies/events{bad}")
            assert refused.status_code == 400 and field in refused.text, refused.text


def _watch_calls(code: str) -> float:
    value = REGISTRY.get_sample_value(
        "grpc_server_handled_total",
        {
            "grpc_service": "loratune.optimizer.v1.OptimizerService",
            "grpc_method": "WatchStudy",
            "grpc_code": code,
        },
    )
    return value or 0.0


async def test_heartbeats_keep_a_quiet_stream_and_leaving_cancels_the_watch(
    make_stack: Any,
) -> None:
    stack = await make_stack(heartbeat_seconds=0.2)  # trainers held: the study stays running
    cancelled_before = _watch_calls("CANCELLED")
    open_before = REGISTRY.get_sample_value("loratune_console_event_streams") or 0.0
    async with stack.client() as http:
        created = await http.post(
            "/api/v1/fine-tuning", json={"project_id": 124, "study_name": "quiet"}
        )
        assert created.status_code == 201
        seen: list[Event] = []
        async with http.stream("GET", "/api/v1/studies/quiet/events") as response:
            async for event in events(response):
                seen.append(event)
                if sum(e.comment == "heartbeat" for e in seen) == 2:
                    break  # the client goes away mid-stream
    assert "trial_started" in [e.event for e in seen]
    # The console noticed and cancelled its WatchStudy call at the optimizer.
    for _ in range(100):
        if _watch_calls("CANCELLED") > cancelled_before:
            break
        await asyncio.sleep(0.05)
    assert _watch_calls("CANCELLED") == cancelled_before + 1
    assert REGISTRY.get_sample_value("loratune_console_event_streams") == open_before
    status = await stack.optimizer.get_study("quiet")
    assert status.record.state in ("QUEUED", "RUNNING")  # the study itself goes on


async def test_stopping_the_console_ends_its_open_streams(stack: Stack) -> None:
    async with stack.client() as http:
        created = await http.post(
            "/api/v1/fine-tuning", json={"project_id": 124, "study_name": "open"}
        )
        assert created.status_code == 201
        async with http.stream("GET", "/api/v1/studies/open/events") as response:
            stream = events(response)
            assert (await anext(stream)).event == "trial_started"
            started = asyncio.get_running_loop().time()
            stopping = asyncio.ensure_future(stack.console.stop())
            rest = [e async for e in stream]
            await stopping
    # The stream ended without waiting for the study (or the 10 s grace period).
    assert asyncio.get_running_loop().time() - started < 5
    assert all(e.event != "study_finished" for e in rest)
