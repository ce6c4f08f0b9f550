"""The JSON API's errors: each class with its HTTP status, its code and the field named.

The statuses come from the one table in services.common.errors; the cases that a real
optimizer and gateway produce are asked of them, the rest of the table of a scripted
optimizer that raises each domain error through the real status interceptor.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import httpx
import pytest

from loratune.optimizer.v1 import optimizer_pb2, optimizer_pb2_grpc
from services.common import errors
from services.common.client import ClientSettings
from services.common.config import CommonSettings
from services.common.server import ServiceDefinition, start_server
from services.console.config import ConsoleSettings
from services.console.main import start_console
from services.console.openapi import openapi_document
from tests.api.console.harness import OpenApi, Stack
from tests.api.console.sse import events

SEED: dict[str, Any] = {
    "project_id": 123,
    "fine_tuning_params": {
        "use_llm_judge": True,
        "judge_model_id": "gemini",
        "base_model_name": "Qwen/Qwen3-0.6B",
        "n_trials": 20,
    },
}


def seed(**fine_tuning: Any) -> dict[str, Any]:
    """The seed's request with some fine-tuning parameters changed."""
    return {**SEED, "fine_tuning_params": {**SEED["fine_tuning_params"], **fine_tuning}}


def error_of(
    response: httpx.Response, status: int, code: str, field: str | None = None
) -> dict[str, Any]:
    """The error body, after checking its status, code, field and shape."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert error["code"] == code
    assert error.get("field") == field
    assert isinstance(error["message"], str) and error["message"]
    return error


async def test_bad_bodies_are_400_naming_the_field(stack: Stack) -> None:
    spec = OpenApi(openapi_document())
    async with stack.client() as http:

        async def post(body: Any) -> httpx.Response:
            response = await http.post("/api/v1/fine-tuning", json=body)
            spec.check("/api/v1/fine-tuning", "post", response)
            return response

        # A typo is refused by the parser, naming the field wherever it is.
        typo = {"project_id": 123, "fine_tuning_param": SEED["fine_tuning_params"]}
        error = error_of(await post(typo), 400, "INVALID_ARGUMENT", "fine_tuning_param")
        assert "no such field" in error["message"]
        nested = {"project_id": 123, "fine_tuning_params": {"n_trial": 20}}
        error_of(await post(nested), 400, "INVALID_ARGUMENT", "fine_tuning_params.n_trial")
        deep = {"project_id": 124, "search_space": {"target_modules": [{"nam": "x"}]}}
        error_of(await post(deep), 400, "INVALID_ARGUMENT", "search_space.target_modules[0].nam")
        error = error_of(
            await post(seed(n_trials="twenty")),
            400,
            "INVALID_ARGUMENT",
            "fine_tuning_params.n_trials",
        )
        assert error["message"].startswith("fine_tuning_params.n_trials: must be an integer")
        # A value the optimizer refuses: its message, and the field recovered from it.
        error = error_of(
            await post(seed(n_trials=200)), 400, "INVALID_ARGUMENT", "fine_tuning_params.n_trials"
        )
        assert "200" in error["message"]
        judged = {**seed(), "project_id": 124}  # a classification project: no judge
        error_of(await post(judged), 400, "INVALID_ARGUMENT", "fine_tuning_params.use_llm_judge")

        # Not JSON, not an object, not JSON's media type, too large.
        broken = await http.post(
            "/api/v1/fine-tuning",
            content=b'{"project_id": 1',
            headers={"Content-Type": "application/json"},
        )
        assert "not valid JSON" in error_of(broken, 400, "INVALID_ARGUMENT")["message"]
        error_of(await post([SEED]), 400, "INVALID_ARGUMENT")
        form = await http.post("/api/v1/fine-tuning", data={"project_id": "123"})
        error_of(form, 415, "INVALID_ARGUMENT")
        spec.check("/api/v1/fine-tuning", "post", form)
        huge = {**SEED, "study_name": "x" * (70 * 1024)}
        error_of(await post(huge), 413, "INVALID_ARGUMENT")

        # Parameters in the path and the query.
        error_of(await http.get("/api/v1/projects/abc"), 400, "INVALID_ARGUMENT", "project_id")
        error_of(await http.get("/api/v1/projects/0"), 400, "INVALID_ARGUMENT", "project_id")
        listing = await http.get("/api/v1/studies", params={"project_id": "x"})
        error_of(listing, 400, "INVALID_ARGUMENT", "project_id")
    # Nothing reached the optimizer as a study.
    assert await stack.optimizer.list_studies(0) == []


async def test_unknown_ids_are_404_with_the_services_words(stack: Stack) -> None:
    spec = OpenApi(openapi_document())
    async with stack.client() as http:
        claude = await http.post("/api/v1/fine-tuning", json=seed(judge_model_id="claude"))
        error = error_of(claude, 404, "NOT_FOUND")
        assert (
            error["message"] == "LLM Judge model not found: 'claude' (available: gemini, gigachat)"
        )
        spec.check("/api/v1/fine-tuning", "post", claude)
        unknown = await http.post("/api/v1/fine-tuning", json={**SEED, "project_id": 999})
        assert error_of(unknown, 404, "NOT_FOUND")["message"] == "project 999 not found"
        project = await http.get("/api/v1/projects/999")
        assert error_of(project, 404, "NOT_FOUND")["message"] == "project 999 not found"
        spec.check("/api/v1/projects/{project_id}", "get", project)
        for method, path, template in [
            ("GET", "/api/v1/studies/nope", "/api/v1/studies/{study_id}"),
            ("POST", "/api/v1/studies/nope:cancel", "/api/v1/studies/{study_id}:cancel"),
            ("GET", "/api/v1/studies/nope/events", "/api/v1/studies/{study_id}/events"),
        ]:
            response = await http.request(method, path)
            assert "nope" in error_of(response, 404, "NOT_FOUND")["message"]
            spec.check(template, method, response)
        # Paths and methods the API does not have answer in the same shape.
        error_of(await http.get("/api/v1/nothing-here"), 404, "NOT_FOUND")
        wrong = await http.get("/api/v1/fine-tuning")
        error_of(wrong, 405, "UNIMPLEMENTED")
        assert wrong.headers["Allow"] == "POST"


async def test_a_wrong_state_is_409_naming_the_field(stack: Stack) -> None:
    async with stack.client() as http:
        # The gateway knows gigachat but holds no credentials for it.
        response = await http.post("/api/v1/fine-tuning", json=seed(judge_model_id="gigachat"))
        error = error_of(response, 409, "FAILED_PRECONDITION", "fine_tuning_params.judge_model_id")
        assert "no credentials" in error["message"]


async def test_services_that_cannot_be_reached_are_503(make_stack: Any) -> None:
    stack = await make_stack(optimizer_up=False, judge=False)
    spec = OpenApi(openapi_document())
    async with stack.client() as http:
        for method, path, template, body in [
            ("POST", "/api/v1/fine-tuning", "/api/v1/fine-tuning", SEED),
            ("GET", "/api/v1/projects", "/api/v1/projects", None),
            ("GET", "/api/v1/studies", "/api/v1/studies", None),
            ("GET", "/api/v1/studies/s/events", "/api/v1/studies/{study_id}/events", None),
            ("GET", "/api/v1/judge-models", "/api/v1/judge-models", None),
        ]:
            response = await http.request(method, path, json=body)
            error = error_of(response, 503, "UNAVAILABLE")
            spec.check(template, method, response)
            assert ("optimizer" if "judge" not in path else "LORATUNE_JUDGE_ADDRESS") in error[
                "message"
            ]
        assert (await http.get("/healthz")).status_code == 200


# ---- the whole table, through a scripted optimizer -----------------------------------------

TABLE = [
    (errors.InvalidArgument("must be 5..100, got 3", field="fine_tuning_params.n_trials"), 400),
    (errors.Unauthenticated("missing or invalid bearer token"), 401),
    (errors.PermissionDenied("this token may not create studies"), 403),
    (errors.NotFound("study 's' not found"), 404),
    (errors.AlreadyExists("study 's' exists with other parameters"), 409),
    (errors.FailedPrecondition("study 's' is already completed"), 409),
    (errors.ResourceExhausted("every trainer is busy"), 429),
    (errors.Internal("an invariant broke"), 500),
    (errors.Cancelled("the optimizer is stopping"), 500),
    (errors.Unavailable("judge gateway: connection refused"), 503),
    (errors.DeadlineExceeded("the storage did not answer"), 504),
]


class ScriptedOptimizer(optimizer_pb2_grpc.OptimizerServiceServicer):
    """CreateStudy raises whatever the test put in `error`; WatchStudy sends one event
    of any study, then raises it."""

    def __init__(self) -> None:
        self.error: BaseException = RuntimeError("unset")

    async def CreateStudy(self, request: Any, context: Any) -> Any:
        raise self.error

    async def GetStudy(self, request: Any, context: Any) -> Any:
        return optimizer_pb2.GetStudyResponse(study=optimizer_pb2.Study(study_id=request.study_id))

    async def WatchStudy(self, request: Any, context: Any) -> AsyncIterator[Any]:
        yield optimizer_pb2.StudyEvent(
            study_id=request.study_id,
            trial_progress=optimizer_pb2.TrialProgress(number=0, step=1, total_steps=4),
        )
        raise self.error


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[ScriptedOptimizer, Callable[[], httpx.AsyncClient]]]:
    fake = ScriptedOptimizer()
    server = await start_server(
        [
            ServiceDefinition(
                full_name="loratune.optimizer.v1.OptimizerService",
                register=lambda s: optimizer_pb2_grpc.add_OptimizerServiceServicer_to_server(
                    fake, s
                ),
            )
        ],
        CommonSettings(),
        host="127.0.0.1",
        metrics_port=None,
    )
    console = await start_console(
        ConsoleSettings(optimizer_address=server.address, host="127.0.0.1"),
        port=0,
        client=ClientSettings(max_attempts=1),
    )
    yield fake, lambda: httpx.AsyncClient(base_url=f"http://127.0.0.1:{console.port}")
    await console.stop()
    await server.stop(0)


@pytest.mark.parametrize(("error", "status"), TABLE, ids=[error.code for error, _ in TABLE])
async def test_each_status_code_has_its_http_status(
    scripted: Any, error: errors.LoratuneError, status: int
) -> None:
    fake, client = scripted
    fake.error = error
    assert error.http_status == status == errors.http_status_of(error.code)
    async with client() as http:
        response = await http.post("/api/v1/fine-tuning", json=SEED)
    body = error_of(response, status, error.code, error.field)
    OpenApi(openapi_document()).check("/api/v1/fine-tuning", "post", response)
    if status < 500:
        assert body["message"] == str(error)  # the service's words, field and all
    elif status == 503:
        assert body["message"] == f"the optimizer is unavailable: {error}"
    elif status == 504:
        assert body["message"] == "the optimizer did not answer in time"
    else:
        assert body["message"] == f"the optimizer failed ({error.code}); see its log"


async def test_an_unexpected_failure_is_500_without_its_details(scripted: Any) -> None:
    fake, client = scripted
    fake.error = RuntimeError("password=hunter2 in a traceback")
    async with client() as http:
        response = await http.post("/api/v1/fine-tuning", json=SEED)
        error = error_of(response, 500, "INTERNAL")
        assert "hunter2" not in response.text and "Traceback" not in response.text
        assert error["message"] == "the optimizer failed (INTERNAL); see its log"


def test_a_field_is_only_recovered_when_the_request_has_it() -> None:
    from services.console.errors import api_error_from_rpc

    def failed(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
        return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)

    request = optimizer_pb2.CreateStudyRequest()
    words = api_error_from_rpc(
        failed(grpc.StatusCode.INVALID_ARGUMENT, "evaluator: refused"), "optimizer", request
    )
    assert (words.field, words.message) == (None, "evaluator: refused")
    nested = api_error_from_rpc(
        failed(grpc.StatusCode.INVALID_ARGUMENT, "dataset.uri: no such file"), "optimizer", request
    )
    assert (nested.status, nested.field) == (400, "dataset.uri")
    # A path that runs on past a scalar field is no field of the request either.
    past = api_error_from_rpc(
        failed(grpc.StatusCode.INVALID_ARGUMENT, "project_id.x: what"), "optimizer", request
    )
    assert past.field is None


async def test_a_failure_mid_stream_is_a_last_error_event(scripted: Any) -> None:
    fake, client = scripted
    fake.error = errors.Unavailable("the optimizer is stopping")
    async with client() as http, http.stream("GET", "/api/v1/studies/s/events") as response:
        assert response.status_code == 200
        received = [e async for e in events(response) if e.comment is None]
    assert [(e.event, e.id) for e in received] == [("trial_progress", "1"), ("error", None)]
    assert received[0].json()["trial_progress"]["total_steps"] == 4
    assert received[1].json() == {
        "error": {
            "code": "UNAVAILABLE",
            "message": "the optimizer is unavailable: the optimizer is stopping",
        }
    }
