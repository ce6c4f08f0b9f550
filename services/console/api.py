"""The console's JSON API (``/api/v1``): launch fine-tuning, projects, studies, judge models.

Each endpoint answers with its RPC's response message as protobuf's JSON (field names as in
the protos, every field printed, enums by name, int64 as strings), and the request of
``POST /api/v1/fine-tuning`` is ``CreateStudyRequest`` in the same mapping, so the seed's
request works as it is. Errors: ``services.console.errors``. Event streams: ``events``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from aiohttp import web
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from loratune.judge.v1 import judge_pb2
from loratune.optimizer.v1 import optimizer_pb2
from services.common.names import excerpt
from services.console.context import BACKENDS, OPTIONS
from services.console.errors import ApiError, api_error_from_rpc, invalid_argument

__all__ = ["message_json", "routes", "rpc"]

logger = logging.getLogger(__name__)

_Reply = TypeVar("_Reply", bound=Message)


def message_json(message: Message) -> dict[str, Any]:
    """A message as the API prints it: proto field names, every field, enums by name."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _json(body: dict[str, Any], status: int = 200, **headers: str) -> web.Response:
    return web.json_response(
        body,
        status=status,
        headers=headers or None,
        dumps=lambda value: json.dumps(value, ensure_ascii=False),
    )


async def rpc(
    request: web.Request,
    service: str,
    method: Callable[..., Awaitable[_Reply]],
    message: Message,
) -> _Reply:
    """``method(message)`` with the caller's token forwarded; its failure as an ``ApiError``."""
    try:
        return await method(message, metadata=request.app[OPTIONS].call_metadata())
    except grpc.aio.AioRpcError as err:
        raise api_error_from_rpc(err, service, message) from None


# ---- the request body ----------------------------------------------------------------------

_FAILED_FIELD = re.compile(r"Failed to parse (\w+) field: ")
_UNKNOWN_FIELD = re.compile(r'has no field named "([^"]+)" at "([^"]+)"')


def _parse_error(error: json_format.ParseError, message: Message) -> ApiError:
    """A 400 for protobuf's JSON parse error, naming the field (as a dotted path) and what
    it takes."""
    text = str(error)
    unknown = _UNKNOWN_FIELD.search(text)
    if unknown is not None:
        # `at "CreateStudyRequest.search_space.target_modules[0]"`: the message's own name first.
        where = unknown.group(2).split(".", 1)
        path = ".".join([*where[1:], unknown.group(1)])
        return invalid_argument(path, "no such field")
    names = _FAILED_FIELD.findall(text)
    reason = _FAILED_FIELD.sub("", text).split(" at ", 1)[0].rstrip(". ")
    if not names:
        return ApiError("INVALID_ARGUMENT", f"the body is not a {_name(message)}: {reason}")
    expected = _expected(message, names)
    return invalid_argument(".".join(names), f"must be {expected} ({reason})")


_KINDS = {
    FieldDescriptor.CPPTYPE_INT32: "an integer",
    FieldDescriptor.CPPTYPE_INT64: "an integer",
    FieldDescriptor.CPPTYPE_UINT32: "an integer >= 0",
    FieldDescriptor.CPPTYPE_UINT64: "an integer >= 0",
    FieldDescriptor.CPPTYPE_DOUBLE: "a number",
    FieldDescriptor.CPPTYPE_FLOAT: "a number",
    FieldDescriptor.CPPTYPE_BOOL: "true or false",
    FieldDescriptor.CPPTYPE_STRING: "a string",
}


def _expected(message: Message, names: list[str]) -> str:
    """What the field at ``names`` takes, in words."""
    descriptor: Any = message.DESCRIPTOR
    field: Any = None
    for name in names:
        field = descriptor.fields_by_name.get(name) if descriptor is not None else None
        if field is None:
            return "a valid value"
        descriptor = field.message_type
    # A repeated field's error is about one of its items: that item's kind.
    if field.enum_type is not None:
        return "one of " + ", ".join(v.name for v in field.enum_type.values)
    if field.message_type is not None:
        return "an object"
    return _KINDS.get(field.cpp_type, "a valid value")


def _name(message: Message) -> str:
    return message.DESCRIPTOR.name


async def parse_body(request: web.Request, message: _Reply) -> _Reply:
    """The JSON body parsed into ``message`` (unknown fields refused), or a 400 / 413 / 415."""
    limit = request.app[OPTIONS].max_body_bytes
    if request.content_type != "application/json":
        # Also what keeps a cross-site HTML form from posting here: it cannot send this type.
        raise ApiError(
            "INVALID_ARGUMENT",
            f"the body must be JSON (Content-Type: application/json), not {request.content_type!r}",
            status=415,
        )
    too_large = ApiError("INVALID_ARGUMENT", f"the body is over {limit} bytes", status=413)
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.read(limit + 1 - size):
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ApiError("INVALID_ARGUMENT", f"the body is not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise ApiError(
            "INVALID_ARGUMENT",
            f"the body must be a JSON object (a {_name(message)}), not {type(document).__name__}",
        )
    try:
        json_format.ParseDict(document, message, ignore_unknown_fields=False)
    except json_format.ParseError as error:
        raise _parse_error(error, message) from None
    return message


def _int_parameter(raw: str, field: str) -> int:
    """An int64 from the path or the query string, or a 400 naming ``field``."""
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or not -(2**63) <= value < 2**63:
        raise invalid_argument(field, f"must be an integer, got {excerpt(raw)!r}")
    return value


# ---- handlers --------------------------------------------------------------------------------


async def create_fine_tuning(request: web.Request) -> web.Response:
    """``POST /api/v1/fine-tuning``: CreateStudy; 201 with the study and its Location."""
    create = await parse_body(request, optimizer_pb2.CreateStudyRequest())
    optimizer = request.app[BACKENDS].optimizer
    reply = await rpc(request, "optimizer", optimizer.CreateStudy, create)
    study_id = reply.study.study_id
    logger.info("study %s created for project %d", study_id, reply.study.project_id)
    return _json(message_json(reply), 201, Location=f"/api/v1/studies/{study_id}")


async def list_projects(request: web.Request) -> web.Response:
    """``GET /api/v1/projects``: ListProjects."""
    optimizer = request.app[BACKENDS].optimizer
    reply = await rpc(
        request, "optimizer", optimizer.ListProjects, optimizer_pb2.ListProjectsRequest()
    )
    return _json(message_json(reply))


async def get_project(request: web.Request) -> web.Response:
    """``GET /api/v1/projects/{project_id}``: GetProject."""
    project_id = _int_parameter(request.match_info["project_id"], "project_id")
    optimizer = request.app[BACKENDS].optimizer
    reply = await rpc(
        request,
        "optimizer",
        optimizer.GetProject,
        optimizer_pb2.GetProjectRequest(project_id=project_id),
    )
    return _json(message_json(reply))


async def list_studies(request: web.Request) -> web.Response:
    """``GET /api/v1/studies[?project_id=N]``: ListStudies, newest first."""
    project_id = _int_parameter(request.query.get("project_id", "") or "0", "project_id")
    optimizer = request.app[BACKENDS].optimizer
    reply = await rpc(
        request,
        "optimizer",
        optimizer.ListStudies,
        optimizer_pb2.ListStudiesRequest(project_id=project_id),
    )
    return _json(message_json(reply))


async def get_study(request: web.Request) -> web.Response:
    """``GET /api/v1/studies/{study_id}[?page_size=N&page_token=T]``: GetStudy with the
    study's trials (ListTrials: all of them, or a page and the next page's token)."""
    study_id = request.match_info["study_id"]
    page_size = _int_parameter(request.query.get("page_size", "") or "0", "page_size")
    optimizer = request.app[BACKENDS].optimizer
    study = await rpc(
        request, "optimizer", optimizer.GetStudy, optimizer_pb2.GetStudyRequest(study_id=study_id)
    )
    trials = await rpc(
        request,
        "optimizer",
        optimizer.ListTrials,
        optimizer_pb2.ListTrialsRequest(
            study_id=study_id,
            page_size=page_size,
            page_token=request.query.get("page_token", ""),
        ),
    )
    return _json({**message_json(study), **message_json(trials)})


async def cancel_study(request: web.Request) -> web.Response:
    """``POST /api/v1/studies/{study_id}:cancel``: CancelStudy; 409 when it already ended."""
    study_id = request.match_info["study_id"]
    optimizer = request.app[BACKENDS].optimizer
    reply = await rpc(
        request,
        "optimizer",
        optimizer.CancelStudy,
        optimizer_pb2.CancelStudyRequest(study_id=study_id),
    )
    logger.info("study %s cancelled", study_id)
    return _json(message_json(reply))


async def list_judge_models(request: web.Request) -> web.Response:
    """``GET /api/v1/judge-models``: the gateway's ListJudgeModels (503 without a gateway)."""
    judge = request.app[BACKENDS].judge
    if judge is None:
        raise ApiError("UNAVAILABLE", "no judge gateway configured (set LORATUNE_JUDGE_ADDRESS)")
    reply = await rpc(
        request, "judge gateway", judge.ListJudgeModels, judge_pb2.ListJudgeModelsRequest()
    )
    return _json(message_json(reply))


def routes() -> list[web.RouteDef]:
    """The API's routes (the event stream and the OpenAPI document are added beside them)."""
    return [
        web.post("/api/v1/fine-tuning", create_fine_tuning),
        web.get("/api/v1/projects", list_projects),
        web.get("/api/v1/projects/{project_id}", get_project),
        web.get("/api/v1/studies", list_studies),
        # Before the study's own route: `{study_id}` alone would match `x:cancel` too.
        web.post("/api/v1/studies/{study_id}:cancel", cancel_study),
        web.get("/api/v1/studies/{study_id}", get_study),
        web.get("/api/v1/judge-models", list_judge_models),
    ]
