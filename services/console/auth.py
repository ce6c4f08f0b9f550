"""The console's auth, the way the gRPC services check LORATUNE_AUTH_TOKEN.

With a token configured, everything but the health check, the static files, the sign-in
page and the API's description needs it:

- programs send ``Authorization: Bearer <token>`` (the JSON API answers 401 without it);
- people sign in once at ``/sign-in`` with the token and get a session cookie, which the
  browser then sends with every page, ``fetch`` and event stream (``EventSource`` cannot
  set headers). The cookie is a session of its own: a random id, its expiry (sign-in +
  ``session_seconds``, LORATUNE_CONSOLE_SESSION_SECONDS, 12 hours by default) and an HMAC
  of both keyed by the token, never the token itself. It opens this console and nothing
  else, ends when it expires, when the token is rotated, or when it signs out (its id is
  then refused until it would have expired), and it is ``HttpOnly`` and
  ``SameSite=Strict``. A request that changes something and is authenticated by the
  cookie must also come from this console's own origin (the ``Origin`` header), so that
  no other site can make a browser launch studies.
- a wrong credential (bearer header, session cookie, sign-in form) slows its client
  address down (``services.common.throttle``): past a few, that address gets ``429`` with
  ``Retry-After`` until its delay passes, whatever it sends; other addresses never do.

The token and the cookie are never logged; the token goes on to the services as gRPC
metadata (``ApiOptions.call_metadata``).
"""

from __future__ import annotations

import hashlib
import hmac
import html
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web
from yarl import URL

from services.common.interceptors import UNAUTHENTICATED_MESSAGE
from services.common.throttle import AuthThrottle
from services.console.context import OPTIONS
from services.console.errors import API_PREFIX, ApiError

__all__ = [
    "OPEN_PATHS",
    "SESSIONS",
    "SESSION_COOKIE",
    "THROTTLE",
    "Sessions",
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
_SESSION_LABEL = "loratune console session v2"
_MAX_COOKIE_CHARS = 200
_MAX_REVOKED = 100_000


def _session_mac(token: str, session_id: str, expires: int) -> str:
    message = f"{_SESSION_LABEL}|{session_id}|{expires}".encode()
    return hmac.new(token.encode("utf-8"), message, hashlib.sha256).hexdigest()


def session_value(token: str, lifetime: int, *, now: float | None = None) -> str:
    """A new session's cookie value: `<id>.<expiry>.<HMAC of both keyed by the token>`."""
    session_id = secrets.token_urlsafe(18)
    expires = int((time.time() if now is None else now) + lifetime)
    return f"{session_id}.{expires}.{_session_mac(token, session_id, expires)}"


class Sessions:
    """Signed-out sessions, refused until they would have expired (bounded, thread-safe)."""

    def __init__(self) -> None:
        self._revoked: dict[str, int] = {}
        self._lock = threading.Lock()

    def valid(self, value: str, token: str, *, now: float | None = None) -> str | None:
        """The session id of a cookie value that is signed by `token`, unexpired and not
        signed out; None otherwise."""
        if not value or len(value) > _MAX_COOKIE_CHARS:
            return None
        session_id, _, rest = value.partition(".")
        expiry, _, mac = rest.partition(".")
        if not session_id or not expiry.isdigit() or len(expiry) > 12:
            return None
        expected = _session_mac(token, session_id, int(expiry))
        if not hmac.compare_digest(mac.encode("utf-8", "replace"), expected.encode("utf-8")):
            return None
        if int(expiry) <= (time.time() if now is None else now):
            return None
        with self._lock:
            if session_id in self._revoked:
                return None
        return session_id

    def revoke(self, value: str, token: str) -> None:
        """Ends the session of a valid cookie value."""
        session_id = self.valid(value, token)
        if session_id is None:
            return
        expiry = int(value.split(".")[1])
        now = time.time()
        with self._lock:
            for old in [k for k, v in self._revoked.items() if v <= now]:
                del self._revoked[old]
            if len(self._revoked) >= _MAX_REVOKED:  # the soonest to expire go first
                del self._revoked[min(self._revoked, key=self._revoked.__getitem__)]
            self._revoked[session_id] = expiry


THROTTLE: web.AppKey[AuthThrottle] = web.AppKey("auth_throttle", AuthThrottle)
SESSIONS: web.AppKey[Sessions] = web.AppKey("sessions", Sessions)


def _bearer_ok(header: str, token: bytes) -> bool:
    scheme, _, credentials = header.partition(" ")
    # compare_digest: the time taken must not tell how much of the token matched.
    return scheme.lower() == "bearer" and hmac.compare_digest(
        credentials.strip().encode("utf-8"), token
    )


def _cookie_ok(request: web.Request, token: str) -> bool:
    value = request.cookies.get(SESSION_COOKIE, "")
    return request.app[SESSIONS].valid(value, token) is not None


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
    throttle = request.app[THROTTLE]
    client = request.remote or "unknown"
    path = "api" if request.path.startswith(API_PREFIX) else "page"
    _refuse_if_slowed(request, throttle, client, path)
    header = request.headers.get("Authorization", "")
    if _bearer_ok(header, token.encode("utf-8")):
        throttle.succeeded(client)
        return await handler(request)
    if _cookie_ok(request, token):
        if request.method not in _SAFE_METHODS and not _same_origin(request):
            raise _refuse(request, "PERMISSION_DENIED", "a request from another site")
        return await handler(request)
    if header or request.cookies.get(SESSION_COOKIE):
        # A wrong token, or a cookie that is forged, expired or signed out: a guess, or
        # as good as one. No credential at all (a first visit) is not counted.
        throttle.failed(client, path)
    if request.path.startswith(API_PREFIX):
        raise _refuse(request, "UNAUTHENTICATED", UNAUTHENTICATED_MESSAGE)
    raise web.HTTPSeeOther(URL(SIGN_IN).with_query(next=safe_next(request.path_qs)))


def _refuse_if_slowed(request: web.Request, throttle: AuthThrottle, client: str, path: str) -> None:
    """429 with Retry-After while `client` is slowed down for its failed authentications."""
    wait = throttle.retry_after(client)
    if wait is None:
        return
    throttle.refused(path)
    message = f"too many failed authentications from this address; retry after {wait} s"
    headers = {"Retry-After": str(wait)}
    if request.path.startswith(API_PREFIX):
        raise ApiError("RESOURCE_EXHAUSTED", message, headers=headers)
    raise web.HTTPTooManyRequests(text=message, headers=headers)


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
    throttle = request.app[THROTTLE]
    client = request.remote or "unknown"
    _refuse_if_slowed(request, throttle, client, "sign_in")
    given = str(form.get("token") or "")[:_MAX_TOKEN_CHARS]
    if not hmac.compare_digest(given.encode("utf-8"), token.encode("utf-8")):
        throttle.failed(client, "sign_in")
        return _sign_in_page(
            next_path, error="That is not this console's access token.", status=401
        )
    throttle.succeeded(client)
    lifetime = request.app[OPTIONS].session_seconds
    response = web.HTTPSeeOther(next_path)
    response.set_cookie(
        SESSION_COOKIE,
        session_value(token, lifetime),
        max_age=lifetime,
        httponly=True,
        samesite="Strict",
        secure=request.secure,
        path="/",
    )
    raise response


async def _sign_out(request: web.Request) -> web.Response:
    token = request.app[OPTIONS].auth_token
    if token is not None:  # the session ends here, not only in this browser
        request.app[SESSIONS].revoke(request.cookies.get(SESSION_COOKIE, ""), token)
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
