"""The OpenAPI 3.1 document of the console's JSON API, served at ``/api/v1/openapi.json``.

The paths, the request and the error shape are written here; the schemas of the protobuf
messages (study, trial, project, judge model, ...) are read off their descriptors, so they
follow the protos: output schemas as the API prints messages (every field without presence
present, int64 as a string, enums by name), input schemas as protobuf's JSON parser takes
them (numbers or strings, no unknown field).
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from loratune.judge.v1 import judge_pb2
from loratune.optimizer.v1 import optimizer_pb2

__all__ = ["SEED_REQUEST", "openapi_document"]

SEED_REQUEST: dict[str, Any] = {
    "project_id": 123,
    "fine_tuning_params": {
        "use_llm_judge": True,
        "judge_model_id": "gemini",
        "base_model_name": "Qwen/Qwen3-0.6B",
        "n_trials": 20,
    },
}

_REF = "#/components/schemas/"
_INT64 = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}
_FLOATS = {FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT}
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?\d+(\.\d+)?s$"},
}


class _Schemas:
    """Schemas of messages by their short name, each added once with those it refers to."""

    def __init__(self) -> None:
        self.schemas: dict[str, dict[str, Any]] = {}
        self._full_names: dict[str, str] = {}

    def ref(self, descriptor: Descriptor, *, output: bool) -> dict[str, Any]:
        """A ``$ref`` to the message's schema, adding it (and what it uses) first."""
        if descriptor.full_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[descriptor.full_name])
        name = descriptor.name if output else f"{descriptor.name}Input"
        known = self._full_names.setdefault(name, descriptor.full_name)
        if known != descriptor.full_name:
            raise ValueError(f"two messages named {name}: {known}, {descriptor.full_name}")
        if name not in self.schemas:
            self.schemas[name] = {}  # placed first: a message may refer to itself
            self.schemas[name] = self._message(descriptor, output=output)
        return {"$ref": _REF + name}

    def _message(self, descriptor: Descriptor, *, output: bool) -> dict[str, Any]:
        properties = {f.name: self._field(f, output=output) for f in descriptor.fields}
        schema: dict[str, Any] = {
            "type": "object",
            "properties": properties,
            "additionalProperties": False,
        }
        if output:
            # Printed with always_print_fields_with_no_presence: only fields with presence
            # (messages, `optional` scalars, oneof cases) may be absent.
            schema["required"] = [f.name for f in descriptor.fields if not f.has_presence]
        return schema

    def _field(self, field: FieldDescriptor, *, output: bool) -> dict[str, Any]:
        message = field.message_type
        if message is not None and message.GetOptions().map_entry:
            value = message.fields_by_name["value"]
            return {"type": "object", "additionalProperties": self._single(value, output=output)}
        single = self._single(field, output=output)
        return {"type": "array", "items": single} if field.is_repeated else single

    def _single(self, field: FieldDescriptor, *, output: bool) -> dict[str, Any]:
        if field.message_type is not None:
            return self.ref(field.message_type, output=output)
        if field.enum_type is not None:
            names = [value.name for value in field.enum_type.values]
            return {"enum": names} if output else {"anyOf": [{"enum": names}, {"type": "integer"}]}
        if field.type in _INT64:
            if output:
                return {"type": "string", "pattern": r"^-?\d+$", "format": "int64"}
            return {"type": ["integer", "string"], "pattern": r"^-?\d+$"}
        if field.type in _FLOATS:
            # protobuf's JSON writes the non-finite values as strings.
            return {"type": ["number", "string"], "pattern": "^(NaN|-?Infinity)$"}
        if field.type == FieldDescriptor.TYPE_BOOL:
            return {"type": "boolean"}
        if field.type == FieldDescriptor.TYPE_STRING:
            return {"type": "string"}
        if field.type == FieldDescriptor.TYPE_BYTES:
            return {"type": "string", "contentEncoding": "base64"}
        return {"type": "integer"} if output else {"type": ["integer", "string"]}


def _error_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["error"],
        "additionalProperties": False,
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "additionalProperties": False,
                "properties": {
                    "code": {
                        "description": "The gRPC status name; the HTTP status follows from it.",
                        "enum": sorted(code.name for code in grpc.StatusCode),
                    },
                    "message": {
                        "type": "string",
                        "description": "What was wrong, naming the field; the services' words "
                        "as they are for client errors (e.g. `LLM Judge model not found: ...`).",
                    },
                    "field": {
                        "type": "string",
                        "description": "The request field that was wrong, as a dotted path "
                        "(`fine_tuning_params.n_trials`), when one was.",
                    },
                },
            }
        },
    }


_ERRORS = {
    "400": "Bad input: a malformed body or parameter, a value out of range (`field` names it).",
    "401": "Missing or wrong `Authorization: Bearer` token (when the console has one).",
    "403": "The token may not do this.",
    "404": "No such project, study, judge model or endpoint.",
    "409": "The target is in the wrong state (e.g. a study that has already ended).",
    "413": "The body is over the size limit (64 KiB by default).",
    "415": "The body is not `application/json`.",
    "429": "A capacity or a rate limit is full; retry later.",
    "500": "An unexpected failure; details only in the log.",
    "503": "The optimizer or the judge gateway cannot be reached.",
    "504": "The optimizer or the judge gateway did not answer in time.",
}


def _json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _responses(ok: str, ok_schema: dict[str, Any], *errors: str) -> dict[str, Any]:
    responses: dict[str, Any] = {
        ok: {"description": "Success.", "content": _json_content(ok_schema)}
    }
    # Any call may be refused for its credentials or a limit, or fail on the way.
    for status in ("400", "401", "403", "429", "500", "503", "504", *errors):
        responses[status] = {
            "description": _ERRORS[status],
            "content": _json_content({"$ref": _REF + "Error"}),
        }
    return dict(sorted(responses.items()))


def _path_parameter(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": schema,
        "description": description,
    }


_STUDY_ID = _path_parameter("study_id", {"type": "string"}, "The study's id.")


@functools.cache
def _document() -> dict[str, Any]:
    schemas = _Schemas()
    out = functools.partial(schemas.ref, output=True)
    create = schemas.ref(optimizer_pb2.CreateStudyRequest.DESCRIPTOR, output=False)
    created = out(optimizer_pb2.CreateStudyResponse.DESCRIPTOR)
    study_with_trials = {
        "type": "object",
        "required": ["study", "trials"],
        "additionalProperties": False,
        "properties": {
            "study": out(optimizer_pb2.Study.DESCRIPTOR),
            "trials": {"type": "array", "items": out(optimizer_pb2.Trial.DESCRIPTOR)},
            "next_page_token": {
                "type": "string",
                "description": "With page_size: the next page's page_token; absent after "
                "the last page.",
            },
        },
    }
    paths: dict[str, Any] = {
        "/api/v1/fine-tuning": {
            "post": {
                "operationId": "createFineTuning",
                "summary": "Start a fine-tuning study (OptimizerService.CreateStudy).",
                "description": "The body is `CreateStudyRequest` in protobuf's JSON mapping; "
                "an unknown field is a 400 naming it. With only a `project_id`, the project "
                "gives the data and the defaults. The same `study_name` again answers the "
                "existing study.",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": create, "example": SEED_REQUEST}},
                },
                "responses": {
                    **_responses("201", created, "404", "409", "413", "415"),
                    "201": {
                        "description": "The study, created and started.",
                        "headers": {
                            "Location": {
                                "description": "`/api/v1/studies/{study_id}`",
                                "schema": {"type": "string"},
                            }
                        },
                        "content": _json_content(created),
                    },
                },
            }
        },
        "/api/v1/projects": {
            "get": {
                "operationId": "listProjects",
                "summary": "The team's projects (OptimizerService.ListProjects).",
                "responses": _responses("200", out(optimizer_pb2.ListProjectsResponse.DESCRIPTOR)),
            }
        },
        "/api/v1/projects/{project_id}": {
            "get": {
                "operationId": "getProject",
                "summary": "One project (OptimizerService.GetProject).",
                "parameters": [
                    _path_parameter("project_id", {"type": "integer"}, "The project's id, > 0.")
                ],
                "responses": _responses(
                    "200", out(optimizer_pb2.GetProjectResponse.DESCRIPTOR), "404"
                ),
            }
        },
        "/api/v1/studies": {
            "get": {
                "operationId": "listStudies",
                "summary": "Studies, newest first (OptimizerService.ListStudies).",
                "parameters": [
                    {
                        "name": "project_id",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer"},
                        "description": "Only this project's studies; 0 or none = all.",
                    }
                ],
                "responses": _responses("200", out(optimizer_pb2.ListStudiesResponse.DESCRIPTOR)),
            }
        },
        "/api/v1/studies/{study_id}": {
            "get": {
                "operationId": "getStudy",
                "summary": "One study and its trials (GetStudy and ListTrials).",
                "parameters": [
                    _STUDY_ID,
                    {
                        "name": "page_size",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 0, "maximum": 1000},
                        "description": "Trials per page; 0 or none = every trial.",
                    },
                    {
                        "name": "page_token",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string"},
                        "description": "The `next_page_token` of the previous page.",
                    },
                ],
                "responses": _responses("200", study_with_trials, "404"),
            }
        },
        "/api/v1/studies/{study_id}:cancel": {
            "post": {
                "operationId": "cancelStudy",
                "summary": "Cancel a study and its running jobs (OptimizerService.CancelStudy).",
                "parameters": [_STUDY_ID],
                "responses": _responses(
                    "200", out(optimizer_pb2.CancelStudyResponse.DESCRIPTOR), "404", "409"
                ),
            }
        },
        "/api/v1/studies/{study_id}/events": {
            "get": {
                "operationId": "watchStudy",
                "summary": "The study's events, server-sent (OptimizerService.WatchStudy).",
                "description": "One event per `StudyEvent`: `id:` its number in the stream, "
                "`event:` the case of its `event` oneof (`trial_started`, `trial_progress`, "
                "`trial_evaluated`, `trial_finished`, `study_finished`), `data:` the message "
                "as JSON (`x-sse-data`). `: heartbeat` comments after 15 s of silence. The "
                "stream ends after `study_finished`; a failure during it is a last "
                "`event: error` whose data is the `Error` JSON.",
                "parameters": [_STUDY_ID],
                "responses": {
                    **_responses("200", {}, "404"),
                    "200": {
                        "description": "The event stream.",
                        "content": {
                            "text/event-stream": {
                                "schema": {"type": "string"},
                                "x-sse-data": out(optimizer_pb2.StudyEvent.DESCRIPTOR),
                            }
                        },
                    },
                },
            }
        },
        "/api/v1/judge-models": {
            "get": {
                "operationId": "listJudgeModels",
                "summary": "Judge models, with credentials or not, and the default "
                "(JudgeGatewayService.ListJudgeModels).",
                "responses": _responses("200", out(judge_pb2.ListJudgeModelsResponse.DESCRIPTOR)),
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "loratune console API",
            "version": "1",
            "description": "Launch and follow LoRA fine-tuning studies. Bodies are the gRPC "
            "messages in protobuf's JSON mapping (proto field names; int64 printed as "
            "strings). Errors are `Error` with the HTTP status of their gRPC code.",
        },
        "servers": [{"url": "/"}],
        "security": [{}, {"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "Required when the console runs with LORATUNE_AUTH_TOKEN.",
                }
            },
            "schemas": {**dict(sorted(schemas.schemas.items())), "Error": _error_schema()},
        },
    }


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``/api/v1`` (a copy: callers may change it)."""
    return copy.deepcopy(_document())
