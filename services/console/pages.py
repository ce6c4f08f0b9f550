"""The console's pages: studies and trials as HTML, and the first JSON endpoints.

- `/`: the studies (`?project=N` for one project), their state, progress and best value;
- `/studies/{id}`: one study, its best adapter, and a table of its trials;
- `/api/studies`, `/api/studies/{id}`: the same as JSON (the protobuf messages' JSON);
- `/healthz`: 200 while the console runs (it does not ask the optimizer);
- `/projects`, `/projects/{id}`, `/studies/{id}/live`: the live console, one HTML shell
  whose script (`static/console.js`, plain JS, no build step) reads the JSON API
  (`/api/v1`) and follows studies through their event streams.

Pages of studies still running refresh themselves every few seconds. An unknown study is
404; an optimizer that cannot be reached is 503, saying so; every text from the optimizer
is HTML-escaped.
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from google.protobuf.json_format import MessageToDict

from loratune.common.v1 import common_pb2
from loratune.optimizer.v1 import optimizer_pb2
from services.common.errors import http_status_of
from services.common.labels import modules_label, study_state, trial_note, trial_state
from services.console.context import BACKENDS, OPTIONS

__all__ = ["API_V1", "REFRESH_SECONDS", "page_errors", "routes"]

logger = logging.getLogger(__name__)

REFRESH_SECONDS = 5
STATIC = Path(__file__).parent / "static"
# Trials asked per ListTrials page.
TRIAL_PAGE = 500
API_V1 = "/api/v1/"
_LIVE = {optimizer_pb2.STUDY_STATE_QUEUED, optimizer_pb2.STUDY_STATE_RUNNING}

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1d232a}
h1{font-size:20px}h1 a{color:inherit;text-decoration:none}
table{border-collapse:collapse;margin:12px 0}
th,td{padding:4px 10px;border-bottom:1px solid #dde2e8;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.COMPLETE,.COMPLETED{color:#17803d}.PRUNED,.CANCELLED{color:#8a6d00}
.FAIL,.FAILED{color:#b42318}.RUNNING,.QUEUED,.WAITING{color:#1d5bd6}
tr.best{background:#eef8f0}.muted{color:#6b7785}code{font-size:13px}
"""


# ---- errors --------------------------------------------------------------------------------

# The console's own credentials, not the reader's: the optimizer refusing them is a bad
# gateway here. Every other code takes its status from the shared table.
_CONSOLE_CREDENTIALS = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}


@web.middleware
async def page_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """An optimizer's failure on a page (HTML) or on the first JSON endpoints (``/api/studies``).

    The JSON API (``/api/v1``) has its own errors (``services.console.errors``).
    """
    if request.path.startswith(API_V1):
        return await handler(request)
    try:
        return await handler(request)
    except grpc.aio.AioRpcError as err:
        code = err.code()
        status = 502 if code in _CONSOLE_CREDENTIALS else http_status_of(code.name)
        if code == grpc.StatusCode.UNAVAILABLE:
            address = request.app[BACKENDS].optimizer_address
            message = f"the optimizer at {address} cannot be reached"
        elif code in _CONSOLE_CREDENTIALS:
            message = "the optimizer refused the console's credentials (LORATUNE_AUTH_TOKEN)"
        elif status >= 500:
            message = f"the optimizer failed ({code.name}); see its log"
        else:
            message = err.details() or code.name
        logger.warning("%s %s: %s %s", request.method, request.path, code.name, message)
        if request.path.startswith("/api/"):
            return web.json_response({"error": message, "code": code.name}, status=status)
        body = f"<p class='FAILED'>{html.escape(message)}</p><p><a href='/'>All studies</a></p>"
        return _page(f"Error {status}", body, status=status)


# ---- JSON ----------------------------------------------------------------------------------


def _dict(message: Any) -> dict[str, Any]:
    return MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _project(request: web.Request) -> int:
    raw = request.query.get("project", "0") or "0"
    try:
        return int(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"project must be an integer, got {raw!r}") from None


async def _list_studies(request: web.Request) -> Sequence[optimizer_pb2.Study]:
    reply = await request.app[BACKENDS].optimizer.ListStudies(
        optimizer_pb2.ListStudiesRequest(project_id=_project(request)),
        metadata=request.app[OPTIONS].call_metadata(),
    )
    return list(reply.studies)


async def _get_study(
    request: web.Request,
) -> tuple[optimizer_pb2.Study, Sequence[optimizer_pb2.Trial]]:
    study_id = request.match_info["study_id"]
    stub = request.app[BACKENDS].optimizer
    metadata = request.app[OPTIONS].call_metadata()
    study = (
        await stub.GetStudy(optimizer_pb2.GetStudyRequest(study_id=study_id), metadata=metadata)
    ).study
    trials: list[optimizer_pb2.Trial] = []
    token = ""
    while True:  # a page of TRIAL_PAGE trials at a time
        reply = await stub.ListTrials(
            optimizer_pb2.ListTrialsRequest(
                study_id=study_id, page_size=TRIAL_PAGE, page_token=token
            ),
            metadata=metadata,
        )
        trials.extend(reply.trials)
        token = reply.next_page_token
        if not token:
            return study, trials


async def _studies_json(request: web.Request) -> web.Response:
    studies = await _list_studies(request)
    return web.json_response({"studies": [_dict(s) for s in studies]}, dumps=_dumps)


async def _study_json(request: web.Request) -> web.Response:
    study, trials = await _get_study(request)
    return web.json_response(
        {"study": _dict(study), "trials": [_dict(t) for t in trials]}, dumps=_dumps
    )


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


# ---- HTML ----------------------------------------------------------------------------------


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _page(title: str, body: str, *, refresh: bool = False, status: int = 200) -> web.Response:
    meta = f"<meta http-equiv='refresh' content='{REFRESH_SECONDS}'>" if refresh else ""
    document = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_e(title)} - loratune</title>{meta}<style>{_STYLE}</style></head>"
        f"<body><h1><a href='/'>loratune</a> / {_e(title)}</h1>{body}</body></html>"
    )
    return web.Response(text=document, content_type="text/html", charset="utf-8", status=status)


def _best(study: optimizer_pb2.Study) -> str:
    if not study.best_trial.HasField("objective"):
        return "-"
    return f"{study.best_trial.objective:.4f} (#{study.best_trial.number})"


async def _studies_page(request: web.Request) -> web.Response:
    studies = await _list_studies(request)
    if not studies:
        body = (
            "<p class='muted'>No studies yet. Start one with <code>loratune tune</code> or"
            " from <a href='/projects'>a project</a>.</p>"
        )
        return _page("Studies", body)
    rows = []
    for s in studies:
        state = study_state(s.state)
        done = s.trials_complete + s.trials_pruned
        rows.append(
            "<tr>"
            f"<td><a href='/studies/{_e(s.study_id)}'>{_e(s.study_id)}</a></td>"
            f"<td class='n'>{s.project_id}</td>"
            f"<td class='{state}'>{state}</td>"
            f"<td class='n'>{done} / {s.fine_tuning_params.n_trials}</td>"
            f"<td class='n'>{s.trials_running}</td><td class='n'>{s.trials_failed}</td>"
            f"<td>{_e(s.objective_name)}</td><td class='n'>{_e(_best(s))}</td>"
            f"<td>{_e(s.fine_tuning_params.base_model_name)}</td>"
            "</tr>"
        )
    body = (
        "<table><tr><th>study</th><th>project</th><th>state</th><th>finished</th>"
        "<th>running</th><th>failed</th><th>objective</th><th>best</th><th>base model</th></tr>"
        + "".join(rows)
        + "</table>"
    )
    return _page("Studies", body, refresh=any(s.state in _LIVE for s in studies))


async def _study_page(request: web.Request) -> web.Response:
    study, trials = await _get_study(request)
    state = study_state(study.state)
    classification = study.dataset.task_type == common_pb2.TASK_TYPE_CLASSIFICATION
    facts = [
        ("state", f"<span class='{state}'>{state}</span>"),
        ("project", str(study.project_id)),
        ("base model", _e(study.fine_tuning_params.base_model_name)),
        ("dataset", _e(study.dataset.uri)),
        (
            "trials",
            f"{study.trials_complete} complete, {study.trials_pruned} pruned, "
            f"{study.trials_failed} failed, {study.trials_running} running of "
            f"{study.fine_tuning_params.n_trials}"
            + (f"; {study.trials_reused} repeats (no job)" if study.trials_reused else ""),
        ),
        *([("ended early", _e(study.end_note))] if study.end_note else []),
        *([("waiting", _e(study.waiting_reason))] if study.waiting_reason else []),
        (f"best {_e(study.objective_name)}", _e(_best(study))),
    ]
    if study.best_model_dir:
        facts.append(("best adapter", f"<code>{_e(study.best_model_dir)}</code>"))
    if study.failure_reason:
        facts.append(("failure", f"<span class='FAILED'>{_e(study.failure_reason)}</span>"))
    if study.excluded_note:
        facts.append(("left out of training", _e(study.excluded_note)))
    body = "<table>" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in facts)
    body += "</table>"
    columns = ["#", "state", "rank", "alpha", "dropout", "lr", "epochs", "modules"]
    if classification:
        columns += ["focal γ", "class weights", "sampler"]
    columns += [_e(study.objective_name or "objective"), "trainer", "note"]
    best = study.best_trial.number if study.best_trial.HasField("objective") else None
    rows = []
    for t in trials:
        h = t.hyperparameters
        cells = [
            f"<td class='n'>{t.number}</td>",
            f"<td class='{trial_state(t.state)}'>{trial_state(t.state)}</td>",
            f"<td class='n'>{h.lora.rank}{' rs' if h.lora.use_rslora else ''}</td>",
            f"<td class='n'>{h.lora.alpha:g}</td>",
            f"<td class='n'>{h.lora.dropout:.2f}</td>",
            f"<td class='n'>{h.training.learning_rate:.1e}</td>",
            f"<td class='n'>{h.training.num_epochs}</td>",
            f"<td>{_e(modules_label(h.lora.target_modules))}</td>",
        ]
        if classification:
            b = h.balancing
            cells += [
                f"<td class='n'>{b.focal_gamma:.1f}</td>",
                f"<td>{'on' if b.use_class_weights else '-'}</td>",
                f"<td>{'on' if b.use_weighted_sampler else '-'}</td>",
            ]
        objective = f"{t.objective:.4f}" if t.HasField("objective") else "-"
        note = trial_note(t)
        cells += [
            f"<td class='n'>{objective}</td>",
            f"<td>{_e(t.trainer)}</td>",
            f"<td class='muted'>{_e(note)}</td>",
        ]
        rows.append(f"<tr{' class=best' if t.number == best else ''}>{''.join(cells)}</tr>")
    body += (
        "<h2>Trials</h2><table><tr>"
        + "".join(f"<th>{c}</th>" for c in columns)
        + "</tr>"
        + "".join(rows)
        + "</table>"
    )
    return _page(study.study_id, body, refresh=study.state in _LIVE)


# ---- the live console -----------------------------------------------------------------------


def _shell(request: web.Request, view: str, title: str, item: str = "") -> web.Response:
    """The live console's page: an empty ``main`` that ``console.js`` fills for ``view``;
    with auth on, a sign-out button."""
    sign_out = (
        "<form method='post' action='/sign-out' class='sign-out'>"
        "<button type='submit'>Sign out</button></form>"
        if request.app[OPTIONS].auth_token is not None
        else ""
    )
    document = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>{_e(title)} - loratune</title>"
        "<link rel='stylesheet' href='/static/console.css'>"
        "<script src='/static/console.js' defer></script></head>"
        f"<body data-view='{_e(view)}' data-id='{_e(item)}'>"
        "<header><h1><a href='/projects'>loratune</a> / "
        f"<span id='title'>{_e(title)}</span></h1>{sign_out}</header>"
        "<main id='main'></main>"
        "<noscript><p>The live console needs JavaScript; <a href='/'>the plain studies page</a>"
        " does not.</p></noscript></body></html>"
    )
    return web.Response(text=document, content_type="text/html", charset="utf-8")


async def _projects_shell(request: web.Request) -> web.Response:
    return _shell(request, "projects", "Projects")


async def _project_shell(request: web.Request) -> web.Response:
    project_id = request.match_info["project_id"]
    return _shell(request, "project", f"Project {project_id}", project_id)


async def _study_shell(request: web.Request) -> web.Response:
    study_id = request.match_info["study_id"]
    return _shell(request, "study", f"Study {study_id}", study_id)


def routes() -> list[web.AbstractRouteDef]:
    """The pages, the live console and its files, the first JSON endpoints, the health check."""
    return [
        web.get("/projects", _projects_shell),
        web.get("/projects/{project_id}", _project_shell),
        web.get("/studies/{study_id}/live", _study_shell),
        web.static("/static", STATIC),
        web.get("/", _studies_page),
        web.get("/studies/{study_id}", _study_page),
        web.get("/api/studies", _studies_json),
        web.get("/api/studies/{study_id}", _study_json),
        web.get("/healthz", _healthz),
    ]
