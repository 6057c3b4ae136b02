"""Browser sessions at the hub, CSRF tokens and page rendering.

The cookie carries only a random session id (HttpOnly, SameSite=Lax, Secure and the `__Host-`
prefix when the issuer is https); what the session verified lives server-side. The id changes
whenever the signed-in account does (session fixation, OWASP ASVS 3.2.1).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web

from identity.hub import HUB, Hub
from identity.store import Session
from identity.trust.levels import Verification
from identity.web.i18n import Translator, language

TEMPLATES = Path(__file__).parent / "templates"
ENV: Any = web.AppKey("jinja", jinja2.Environment) if hasattr(web, "AppKey") else "cityplane.jinja"
MAX_FLOWS = 8  # authorization requests in progress per session (tabs); oldest dropped

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "form-action 'self' http: https:; frame-ancestors 'none'; base-uri 'none'; "
        "connect-src 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
}


def cookie_name(hub: Hub) -> str:
    return "__Host-cityplane_session" if hub.secure_cookies else "cityplane_session"


async def load_session(request: web.Request) -> Session | None:
    hub: Hub = request.app[HUB]
    sid = request.cookies.get(cookie_name(hub))
    if not sid or len(sid) > 128:
        return None
    return await hub.store.session(sid)


async def ensure_session(request: web.Request) -> Session:
    session = await load_session(request)
    if session is not None:
        return session
    hub: Hub = request.app[HUB]
    return await hub.store.create_session(
        lifetime=hub.settings.session_ttl,
        user_agent=request.headers.get("User-Agent"),
        ip=request.remote,
    )


async def sign_in(request: web.Request, session: Session, account_id: str) -> Session:
    """Bind `session` to `account_id`; a different account gets a fresh session id and none of
    the previous account's verifications."""
    hub: Hub = request.app[HUB]
    if session.account_id == account_id:
        return session
    fresh = await hub.store.create_session(
        lifetime=hub.settings.session_ttl,
        user_agent=request.headers.get("User-Agent"),
        ip=request.remote,
    )
    fresh.account_id = account_id
    fresh.state = {
        "csrf": fresh.state["csrf"],
        "flows": session.state.get("flows", {}),
        "verifications": [],
    }
    await hub.store.save_session(fresh)
    await hub.store.end_session(session.id)
    return fresh


def set_cookie(request: web.Request, response: web.StreamResponse, session: Session) -> None:
    hub: Hub = request.app[HUB]
    if DEVICE_COOKIE not in request.cookies:
        response.set_cookie(
            DEVICE_COOKIE,
            secrets.token_urlsafe(24),
            max_age=5 * 365 * 86400,
            path="/",
            httponly=True,
            secure=hub.secure_cookies,
            samesite="Lax",
        )
    response.set_cookie(
        cookie_name(hub),
        session.id,
        max_age=int(max(0, session.expires_at - time.time())),
        path="/",
        httponly=True,
        secure=hub.secure_cookies,
        samesite="Lax",
    )


def csrf_token(session: Session) -> str:
    token = session.state.get("csrf")
    if not token:
        token = session.state["csrf"] = secrets.token_urlsafe(24)
    return str(token)


def csrf_ok(session: Session, given: str | None) -> bool:
    expected = session.state.get("csrf")
    return bool(expected and given and hmac.compare_digest(str(expected), given))


DEVICE_COOKIE = "cityplane_device"
BOUND_METHODS = frozenset({"face", "cert"})  # what level 4 rests on: bound to the device


def device_of(request: web.Request) -> str | None:
    """This browser's device binding: the long-lived device cookie together with the user
    agent. A level-4 verification made on one device does not count on another (a copied
    session cookie, a new browser): the person verifies again there."""
    cookie = request.cookies.get(DEVICE_COOKIE)
    if not cookie or len(cookie) > 64:
        return None
    agent = request.headers.get("User-Agent", "")
    return hashlib.sha256(f"{cookie}|{agent}".encode()).hexdigest()[:32]


def verifications(session: Session, device: str | None = None) -> list[Verification]:
    """What this session verified; device-bound ones only on the device that made them."""
    return [
        Verification(v["method"], float(v["at"]), v.get("level"))
        for v in session.state.get("verifications", [])
        if v["method"] not in BOUND_METHODS or (device is not None and v.get("device") == device)
    ]


def add_verification(
    session: Session, method: str, at: float, level: int | None = None, device: str | None = None
) -> None:
    kept = [v for v in session.state.get("verifications", []) if v["method"] != method]
    kept.append({"method": method, "at": at, "level": level, "device": device})
    session.state["verifications"] = kept


def new_flow(session: Session, flow: dict[str, Any]) -> str:
    flows: dict[str, Any] = session.state.setdefault("flows", {})
    while len(flows) >= MAX_FLOWS:
        flows.pop(min(flows, key=lambda k: flows[k]["created"]))
    fid = secrets.token_urlsafe(12)
    flows[fid] = {**flow, "created": time.time()}
    return fid


def flow_of(session: Session | None, fid: str | None) -> dict[str, Any] | None:
    if session is None or not fid:
        return None
    flow = session.state.get("flows", {}).get(fid)
    if flow is None or time.time() - flow["created"] > 1800:  # 30 min to finish a sign-in
        return None
    return dict(flow) if isinstance(flow, dict) else None


def save_flow(session: Session, fid: str, flow: dict[str, Any] | None) -> None:
    flows = session.state.setdefault("flows", {})
    if flow is None:
        flows.pop(fid, None)
    else:
        flows[fid] = flow


def render(
    request: web.Request,
    template: str,
    *,
    status: int = 200,
    session: Session | None = None,
    **context: Any,
) -> web.Response:
    lang = language(request)
    env: jinja2.Environment = request.app[ENV]
    body = env.get_template(template).render(
        t=Translator(lang),
        lang=lang,
        csrf=csrf_token(session) if session is not None else "",
        lang_en=str(request.rel_url.update_query(lang="en"))
        if request.method == "GET"
        else "?lang=en",
        lang_zh=str(request.rel_url.update_query(lang="zh"))
        if request.method == "GET"
        else "?lang=zh",
        **context,
    )
    response = web.Response(text=body, status=status, content_type="text/html", charset="utf-8")
    response.headers.update(SECURITY_HEADERS)
    if request.query.get("lang") in ("en", "zh"):
        response.set_cookie("cityplane_lang", request.query["lang"], max_age=31536000, path="/")
    if session is not None:
        set_cookie(request, response, session)
    return response


def template_environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        enable_async=False,
    )


def redirect(location: str, status: int = 302) -> web.Response:
    return web.Response(status=status, headers={"Location": location, "Cache-Control": "no-store"})
