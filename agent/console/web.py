"""The console's pages: server-rendered (Starlette + Jinja2), live through server-sent events.

Every page that changes has a fragment URL; the page's script fetches it again whenever the event
stream says the store changed. Every POST carries the session's CSRF token; every permission is
checked here, on the server, whatever the page offers.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import math
import re
import secrets
import struct
import time
import wave
from collections.abc import Callable
from contextlib import asynccontextmanager
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from agent.console.auth import LoginRefused, Session, same_token
from agent.console.fleet import device_marks, fleet_rows
from agent.console.map import map_layers
from agent.console.state import OUTCOMES

if TYPE_CHECKING:
    from agent.console.server import Console

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SESSION_COOKIE = "edge_console_session"
LOGIN_COOKIE = "edge_console_login"  # the login form's CSRF token (double submit), before there is a session
#: Seconds between keep-alive comments on an idle event stream (proxies close silent connections).
KEEPALIVE_S = 15.0
MAX_NOTE = 2000

_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " media-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",  # pages hold alerts and names: nothing kept in the browser beyond the page
}


class SecurityHeaders:
    """Adds ``_HEADERS`` to every response (plain ASGI, so event streams pass through untouched)."""

    def __init__(self, app, tiles_origin: str | None = None):
        self.app = app
        self.headers = dict(_HEADERS)
        if tiles_origin:  # the city's tile server is the one place images may come from besides the console
            policy = self.headers["Content-Security-Policy"]
            self.headers["Content-Security-Policy"] = policy.replace("img-src 'self'", f"img-src 'self' {tiles_origin}")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        static = scope["path"].startswith("/static/")

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in self.headers.items():
                    if name not in headers and not (static and name == "Cache-Control"):
                        headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)


@cache
def alert_sound() -> bytes:
    """A short two-tone WAV made here (no asset to fetch): played for a new real alert, never a test one."""
    rate, tones = 16000, ((880.0, 0.18), (0.0, 0.06), (660.0, 0.18), (0.0, 0.06), (880.0, 0.18))
    frames = bytearray()
    for frequency, seconds in tones:
        count = int(rate * seconds)
        for n in range(count):
            fade = min(1.0, n / 160, (count - n) / 160)  # no clicks at the edges
            sample = 0.5 * fade * math.sin(2 * math.pi * frequency * n / rate) if frequency else 0.0
            frames += struct.pack("<h", int(sample * 32767))
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(bytes(frames))
    return out.getvalue()


def _when(at: float | None) -> str:
    return "-" if at is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def create_app(console: Console) -> Starlette:
    """The console's ASGI application, wired to ``console`` (store, sessions, change feed, responder)."""
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["when"] = _when
    templates.env.filters["ago"] = _ago
    settings = console.config.console

    def session_of(request: Request) -> Session | None:
        return console.sessions.find(request.cookies.get(SESSION_COOKIE))

    def render(request: Request, name: str, session: Session | None, status: int = 200, **context: Any) -> Response:
        return templates.TemplateResponse(
            request, name, {"session": session, "outcomes": OUTCOMES, **context}, status_code=status
        )

    def page(permission: str, fragment: bool = False):
        """Decorator: the session (with ``permission``) or a redirect to log in (401/403 for fragments)."""

        def wrap(handler: Callable):
            async def endpoint(request: Request) -> Response:
                session = session_of(request)
                if session is None:
                    if fragment:
                        return PlainTextResponse("log in again", status_code=401)
                    return RedirectResponse("/login", status_code=303)
                if not session.may(permission):
                    return PlainTextResponse(f"your role ({session.role}) may not do this", status_code=403)
                return await handler(request, session)

            return endpoint

        return wrap

    async def checked_form(request: Request, session: Session) -> dict[str, str] | None:
        """The POSTed form if it carries this session's CSRF token, else None."""
        form = await request.form()
        values = {k: v for k, v in form.items() if isinstance(v, str)}
        return values if same_token(values.get("csrf"), session.csrf) else None

    def refused_csrf() -> Response:
        return PlainTextResponse("refused: missing or wrong CSRF token (reload the page)", status_code=403)

    # --- login

    async def login_form(request: Request) -> Response:
        token = secrets.token_urlsafe(32)
        response = render(request, "login.html", None, login_token=token, error=None)
        _set_cookie(response, LOGIN_COOKIE, token, settings.secure_cookies, max_age=3600)
        return response

    async def login(request: Request) -> Response:
        form = await request.form()
        name, password = str(form.get("name", ""))[:64], str(form.get("password", ""))[:1024]
        if not same_token(str(form.get("csrf", "")), request.cookies.get(LOGIN_COOKIE, "") or "-"):
            return refused_csrf()
        address = request.client.host if request.client else "?"
        try:
            session = await run_in_threadpool(console.sessions.login, name, password, address)
        except LoginRefused as exc:
            log.warning("console: a login was refused (%s)", exc)  # no name, no address: no personal data
            token = secrets.token_urlsafe(32)
            response = render(request, "login.html", None, 401, login_token=token, error=str(exc))
            _set_cookie(response, LOGIN_COOKIE, token, settings.secure_cookies, max_age=3600)
            return response
        await run_in_threadpool(console.state.audit, console.clock(), session.operator, "login", session.role)
        response = RedirectResponse("/", status_code=303)
        _set_cookie(response, SESSION_COOKIE, session.token, settings.secure_cookies)
        response.delete_cookie(LOGIN_COOKIE)
        return response

    @page("view")
    async def logout(request: Request, session: Session) -> Response:
        if await checked_form(request, session) is None:
            return refused_csrf()
        console.sessions.logout(session.token)
        await run_in_threadpool(console.state.audit, console.clock(), session.operator, "logout")
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE)
        return response

    # --- the queue

    def queue_context() -> dict[str, Any]:
        open_alerts, closed = console.state.queue(settings.queue_closed_shown)
        marks = device_marks(console.store, settings.clock_fault_s)
        return {"open_alerts": open_alerts, "closed": closed, "marks": marks}

    @page("view")
    async def queue(request: Request, session: Session) -> Response:
        context = await run_in_threadpool(queue_context)
        return render(request, "queue.html", session, **context)

    fragment_cache: dict[str, tuple[int, bytes]] = {}  # the queue fragment is the same for everyone
    fragment_lock = asyncio.Lock()

    @page("view", fragment=True)
    async def queue_fragment(request: Request, session: Session) -> Response:
        """Rendered once per change however many consoles ask (keyed by the feed's version read first)."""
        async with fragment_lock:  # twenty consoles asking at once: one renders, the others take its page
            version = console.feed.version
            cached = fragment_cache.get("queue")
            if cached is None or cached[0] != version:
                context = await run_in_threadpool(queue_context)
                html = render(request, "_queue.html", session, **context).body
                cached = fragment_cache["queue"] = (version, bytes(html))
        return Response(cached[1], media_type="text/html")

    # --- one alert

    def alert_context(request: Request) -> dict[str, Any] | None:
        try:
            device, seq = request.path_params["device"], int(request.path_params["seq"])
        except ValueError:
            return None
        alert = console.state.alert(device, seq)
        if alert is None:
            return None
        marks = device_marks(console.store, settings.clock_fault_s)
        notice = request.query_params.get("notice", "")[:200]
        return {"alert": alert, "marks": marks, "notice": notice, "handlers": console.state.handlers()}

    def not_found() -> Response:
        return PlainTextResponse("no such alert", status_code=404)

    @page("view")
    async def alert_page(request: Request, session: Session) -> Response:
        context = await run_in_threadpool(alert_context, request)
        return not_found() if context is None else render(request, "alert.html", session, **context)

    @page("view", fragment=True)
    async def alert_fragment(request: Request, session: Session) -> Response:
        context = await run_in_threadpool(alert_context, request)
        return not_found() if context is None else render(request, "_alert.html", session, **context)

    def alert_form(permission: str):
        """Decorator for a form POSTed about one alert: role, CSRF token and the alert checked before the handler."""

        def wrap(handler: Callable):
            @page(permission)
            async def endpoint(request: Request, session: Session) -> Response:
                form = await checked_form(request, session)
                if form is None:
                    return refused_csrf()
                context = await run_in_threadpool(alert_context, request)
                return not_found() if context is None else await handler(request, session, form, context)

            return endpoint

        return wrap

    @alert_form("handle")
    async def take(request: Request, session: Session, form: dict[str, str], context: dict) -> Response:
        notice = await run_in_threadpool(console.take_charge, context["alert"], session.operator)
        return _back_to(context["alert"], notice)

    @alert_form("handle")
    async def close(request: Request, session: Session, form: dict[str, str], context: dict) -> Response:
        outcome, note = form.get("outcome", ""), form.get("note", "").strip()[:MAX_NOTE]
        if outcome not in OUTCOMES:
            return PlainTextResponse(f"choose an outcome: {', '.join(OUTCOMES)}", status_code=400)
        closed = await run_in_threadpool(
            console.state.close, context["alert"], session.operator, outcome, note, console.clock()
        )
        return _back_to(context["alert"], "closed" if closed else "it was already closed")

    @alert_form("reassign")
    async def reassign(request: Request, session: Session, form: dict[str, str], context: dict) -> Response:
        """A supervisor gives a taken alert to someone else (the holder went off shift, or is busy)."""
        alert, holder, to = context["alert"], form.get("holder", ""), form.get("to", "")
        moved = await run_in_threadpool(console.state.reassign, alert, session.operator, holder, to, console.clock())
        refusal = f"not given to {to!r}: it has changed, or they cannot hold it"
        return _back_to(alert, f"given to {to}" if moved else refusal)

    @alert_form("evidence")
    async def evidence(request: Request, session: Session, form: dict[str, str], context: dict) -> Response:
        data, problem = await run_in_threadpool(console.view_evidence, context["alert"], session.operator)
        image = None if data is None else "data:image/jpeg;base64," + base64.b64encode(data).decode()
        return render(request, "evidence.html", session, image=image, problem=problem, **context)

    # --- fleet and audit

    def fleet_context() -> dict[str, Any]:
        rows = fleet_rows(console.store, console.state, console.keyring, console.config.receiver.supervision_s)
        return {"rows": rows, "clock_fault_s": settings.clock_fault_s}

    def page_and_fragment(name: str, context: Callable[[], dict[str, Any]]):
        """The page ``name.html`` and its live part ``_name.html``, both drawn from ``context()``."""

        @page("view")
        async def whole(request: Request, session: Session) -> Response:
            return render(request, f"{name}.html", session, **await run_in_threadpool(context))

        @page("view", fragment=True)
        async def fragment(request: Request, session: Session) -> Response:
            return render(request, f"_{name}.html", session, **await run_in_threadpool(context))

        return whole, fragment

    fleet, fleet_fragment = page_and_fragment("fleet", fleet_context)

    def map_context() -> dict[str, Any]:
        rows = fleet_rows(console.store, console.state, console.keyring, console.config.receiver.supervision_s)
        devices = {d.device_id: d for d in console.keyring.devices()}
        unplaced = [r.device for r in rows if r.device not in devices or devices[r.device].position is None]
        layers = map_layers(rows, devices, settings.plans_dir, settings.map_tiles_url)
        return {"layers": layers, "unplaced": unplaced}

    map_page, map_fragment = page_and_fragment("map", map_context)

    @page("view")
    async def plan_image(request: Request, session: Session) -> Response:
        name = request.path_params["plan"]
        if settings.plans_dir is None or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
            return PlainTextResponse("no such plan", status_code=404)
        path = settings.plans_dir / f"{name}.png"
        if not path.is_file():
            return PlainTextResponse("no such plan", status_code=404)
        return FileResponse(path, media_type="image/png")

    @page("audit")
    async def audit(request: Request, session: Session) -> Response:
        entries = await run_in_threadpool(console.state.audit_log, 500)
        return render(request, "audit.html", session, entries=entries)

    # --- live updates and assets

    signature_lock = asyncio.Lock()
    signature: list = [-1, None]  # [feed version, queue signature]: computed once per change for all streams

    async def queue_signature(version: int):
        async with signature_lock:
            if signature[0] != version:
                signature[:] = [version, await run_in_threadpool(console.state.queue_signature)]
            return signature[1]

    @page("view", fragment=True)
    async def events(request: Request, session: Session) -> Response:
        """ "change" on every commit seen; "queue" only when the queue's content changed (pages pick one)."""

        async def stream():
            seen = console.feed.version
            queue_seen = await queue_signature(seen)
            yield f"retry: 1000\nevent: hello\ndata: {seen}\n\n"
            while console.sessions.find(session.token) is not None:
                now = await console.feed.next_change(seen, KEEPALIVE_S)
                if console.feed.closing:
                    return
                if now == seen:
                    yield ": keep-alive\n\n"
                    continue
                seen = now
                yield f"event: change\ndata: {seen}\n\n"
                queue_now = await queue_signature(now)
                if queue_now != queue_seen:
                    queue_seen = queue_now
                    yield f"event: queue\ndata: {seen}\n\n"

        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}  # nginx: pass each event on at once
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    async def sound(request: Request) -> Response:
        return Response(alert_sound(), media_type="audio/wav", headers={"Cache-Control": "max-age=3600"})

    @asynccontextmanager
    async def lifespan(app: Starlette):
        console.feed.start(asyncio.get_running_loop())
        yield
        console.feed.close()

    routes = [
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/", queue),
        Route("/fragment/queue", queue_fragment),
        Route("/alerts/{device}/{seq}", alert_page),
        Route("/fragment/alerts/{device}/{seq}", alert_fragment),
        Route("/alerts/{device}/{seq}/take", take, methods=["POST"]),
        Route("/alerts/{device}/{seq}/close", close, methods=["POST"]),
        Route("/alerts/{device}/{seq}/reassign", reassign, methods=["POST"]),
        Route("/alerts/{device}/{seq}/evidence", evidence, methods=["POST"]),
        Route("/fleet", fleet),
        Route("/fragment/fleet", fleet_fragment),
        Route("/map", map_page),
        Route("/fragment/map", map_fragment),
        Route("/plans/{plan}.png", plan_image),
        Route("/audit", audit),
        Route("/events", events),
        Route("/static/alert.wav", sound),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    return Starlette(
        routes=routes, middleware=[Middleware(SecurityHeaders, tiles_origin=settings.tiles_origin)], lifespan=lifespan
    )


def _back_to(alert, notice: str) -> Response:
    from urllib.parse import quote

    return RedirectResponse(f"/alerts/{quote(alert.device)}/{alert.seq}?notice={quote(notice)}", status_code=303)


def _set_cookie(response: Response, name: str, value: str, secure: bool, max_age: int | None = None) -> None:
    response.set_cookie(name, value, max_age=max_age, httponly=True, samesite="strict", secure=secure, path="/")
