"""The console's auth, the way the gRPC services check LORATUNE_AUTH_TOKEN.

With a token configured, everything but the health check, the static files, the sign-in
page and the API's description needs it:

- programs send ``Authorization: Bearer <token>`` (the JSON API answers 401 without it);
- people sign in once at ``/sign-in`` with the token and get a session cookie, which the
  browser then sends with every page, ``fetch`` and event stream (``EventSource`` cannot
  set headers). The cookie holds an HMAC of the token, not the token: it opens this console
  and nothing else, and it is ``HttpOnly`` and ``SameSite=Strict``. A request that changes
  something and is authenticated by the cookie must also come from this console's own
  origin (the ``Origin`` header), so that no other site can make a browser launch studies.

The token and the cookie are never logged; the token goes on to the services as gRPC
metadata (``ApiOptions.call_metadata``).
"""

from __future__ import annotations

import hashlib
import hmac
import html
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web
from yarl import URL

from services.common.interceptors import UNAUTHENTICATED_MESSAGE
from services.console.context import OPTIONS
from services.console.errors import API_PREFIX, ApiError

__all__ = [
    "OPEN_PATHS",
    "SESSION_COOKIE",
    "bearer_auth",
    "routes",
    "safe_next",
    "session_value",
]

SESSION_COOKIE = "loratune_session"
SIGN_IN = "/sign-in"
SIGN_OUT = "/sign-out"
# Open without credentials: they hold no data.
OPEN_PATHS = frozenset({"/api/v1/openapi.json", "/healthz", SIGN_IN, "/favicon.ico"})
OPEN_PREFIXES = ("/static/",)
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_MAX_TOKEN_CHARS = 4096
_MAX_NEXT_CHARS = 512
_SESSION_LABEL = b"loratune console session v1"


def session_value(token: str) -> str:
    """The cookie's value for ``token``: an HMAC, so the cookie is not the token itself."""
    return hmac.new(token.encode("utf-8"), _SESSION_LABEL, hashlib.sha256).hexdigest()


def _bearer_ok(header: str, token: bytes) -> bool:
    scheme, _, credentials = header.partition(" ")
    # compare_digest: the time taken must not tell how much of the token matched.
    return scheme.lower() == "bearer" and hmac.compare_digest(
        credentials.strip().encode("utf-8"), token
    )


def _cookie_ok(request: web.Request, token: str) -> bool:
    value = request.cookies.get(SESSION_COOKIE, "")
    return bool(value) and hmac.compare_digest(
        value.encode("utf-8", "replace"), session_value(token).encode("utf-8")
    )


def _same_origin(request: web.Request) -> bool:
    origin = request.headers.get("Origin")
    if origin is None:
        # Browsers send Origin with every cross-site POST; its absence is a same-site form
        # or a program, and programs use the bearer header.
        return True
    return urlsplit(origin).netloc == request.host


def safe_next(value: str | None) -> str:
    """Where to go after signing in: a path on this console, never another site."""
    if (
        not value
        or len(value) > _MAX_NEXT_CHARS
        or not value.startswith("/")
        or value.startswith("//")
        or "\\" in value
        or any(ord(c) < 0x20 for c in value)
    ):
        return "/projects"
    return value


def _is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


@web.middleware
async def bearer_auth(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """With a token configured, a request needs the bearer header or the session cookie.

    Without either, the JSON API answers 401 (JSON, ``WWW-Authenticate: Bearer``) and a
    page sends the browser to ``/sign-in``, to come back after.
    """
    token = request.app[OPTIONS].auth_token
    if token is None or _is_open(request.path):
        return await handler(request)
    if _bearer_ok(request.headers.get("Authorization", ""), token.encode("utf-8")):
        return await handler(request)
    if _cookie_ok(request, token):
        if request.method not in _SAFE_METHODS and not _same_origin(request):
            raise _refuse(request, "PERMISSION_DENIED", "a request from another site")
        return await handler(request)
    if request.path.startswith(API_PREFIX):
        raise _refuse(request, "UNAUTHENTICATED", UNAUTHENTICATED_MESSAGE)
    raise web.HTTPSeeOther(URL(SIGN_IN).with_query(next=safe_next(request.path_qs)))


def _refuse(request: web.Request, code: str, message: str) -> Exception:
    headers = {"WWW-Authenticate": "Bearer"} if code == "UNAUTHENTICATED" else None
    if request.path.startswith(API_PREFIX):
        return ApiError(code, message, headers=headers)
    status = web.HTTPUnauthorized if code == "UNAUTHENTICATED" else web.HTTPForbidden
    return status(text=message, headers=headers)


# ---- the sign-in page ------------------------------------------------------------------------


def _sign_in_page(next_path: str, *, error: str = "", status: int = 200) -> web.Response:
    alert = f"<p class='error' role='alert'>{html.escape(error)}</p>" if error else ""
    document = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        "<title>Sign in - loratune</title>"
        "<link rel='stylesheet' href='/static/console.css'></head><body>"
        "<header><h1>loratune</h1></header><main>"
        "<h2>Sign in</h2>"
        "<p class='muted'>This console asks for the services' access token "
        "(LORATUNE_AUTH_TOKEN).</p>"
        f"<form method='post' action='{SIGN_IN}' class='sign-in'>"
        f"<input type='hidden' name='next' value='{html.escape(next_path)}'>"
        "<label for='token'>Access token</label> "
        "<input type='password' id='token' name='token' required autocomplete='current-password'"
        f" maxlength='{_MAX_TOKEN_CHARS}' autofocus> "
        f"<button type='submit'>Sign in</button>{alert}</form></main></body></html>"
    )
    return web.Response(text=document, content_type="text/html", charset="utf-8", status=status)


async def _sign_in_form(request: web.Request) -> web.Response:
    next_path = safe_next(request.query.get("next"))
    if request.app[OPTIONS].auth_token is None:
        raise web.HTTPSeeOther(next_path)
    return _sign_in_page(next_path)


async def _sign_in(request: web.Request) -> web.Response:
    token = request.app[OPTIONS].auth_token
    form = await request.post()
    next_path = safe_next(str(form.get("next") or ""))
    if token is None:
        raise web.HTTPSeeOther(next_path)
    if not _same_origin(request):
        raise web.HTTPForbidden(text="a sign-in from another site")
    given = str(form.get("token") or "")[:_MAX_TOKEN_CHARS]
    if not hmac.compare_digest(given.encode("utf-8"), token.encode("utf-8")):
        return _sign_in_page(
            next_path, error="That is not this console's access token.", status=401
        )
    response = web.HTTPSeeOther(next_path)
    response.set_cookie(
        SESSION_COOKIE,
        session_value(token),
        httponly=True,
        samesite="Strict",
        secure=request.secure,
        path="/",
    )
    raise response


async def _sign_out(request: web.Request) -> web.Response:
    response = web.HTTPSeeOther(SIGN_IN)
    response.del_cookie(SESSION_COOKIE, path="/")
    raise response


def routes() -> list[web.AbstractRouteDef]:
    """The sign-in page and form, and signing out."""
    return [
        web.get(SIGN_IN, _sign_in_form),
        web.post(SIGN_IN, _sign_in),
        web.post(SIGN_OUT, _sign_out),
    ]
