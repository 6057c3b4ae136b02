"""The account page (methods, sessions, consents, which apps read my data) and logout
(OpenID Connect RP-Initiated Logout 1.0 and Back-Channel Logout 1.0)."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any
from urllib.parse import urlencode

import aiohttp
import jwt
from aiohttp import web

from identity.hub import HUB, Hub
from identity.store import Session
from identity.trust.sms import mask_phone
from identity.web.session import (
    csrf_ok,
    ensure_session,
    load_session,
    new_flow,
    redirect,
    render,
    set_cookie,
)

log = logging.getLogger(__name__)

BACKCHANNEL_EVENT = "http://schemas.openid.net/event/backchannel-logout"
ACCESS_ACTIONS = ("token.issued", "userinfo.read")


async def account_page(request: web.Request) -> web.StreamResponse:
    hub: Hub = request.app[HUB]
    session = await load_session(request)
    account = (
        await hub.store.account(session.account_id) if session and session.account_id else None
    )
    if session is None or account is None:
        session = session or await ensure_session(request)
        fid = new_flow(
            session,
            {
                "params": [],
                "client_id": None,
                "target": 1,
                "max_age": None,
                "return_to": "/account",
            },
        )
        await hub.store.save_session(session)
        response = redirect(f"/login?flow={fid}")
        set_cookie(request, response, session)
        return response
    passkeys = await hub.store.passkeys_of(account.id)
    sessions = await hub.store.sessions_of(account.id)
    consents = await hub.store.consents_of(account.id)
    accesses = await hub.audit.entries(subject=account.id, actions=ACCESS_ACTIONS, limit=50)
    return render(
        request,
        "account.html",
        session=session,
        account=account,
        phone=mask_phone(account.phone) if account.phone else "",
        passkeys=passkeys,
        sessions=[
            {
                "id": s.id,
                "current": s.id == session.id,
                "seen": _when(s.seen_at),
                "ua": s.user_agent or "",
                "ip": s.ip or "",
            }
            for s in sessions
        ],
        consents=[{**c, "granted": _when(c["granted_at"])} for c in consents],
        accesses=[{**a, "when": _when(a["at"])} for a in accesses],
    )


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


async def _signed_in(request: web.Request) -> tuple[Hub, Session, dict[str, str]]:
    hub: Hub = request.app[HUB]
    form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
    session = await load_session(request)
    if session is None or not session.account_id or not csrf_ok(session, form.get("csrf")):
        raise web.HTTPSeeOther("/account")
    return hub, session, form


async def revoke_session(request: web.Request) -> web.StreamResponse:
    hub, session, form = await _signed_in(request)
    target = form.get("session", "")
    mine = {s.id for s in await hub.store.sessions_of(session.account_id or "")}
    if target in mine:
        await end_session(hub, target, session.account_id)
        await hub.audit.record(
            "account.session_revoked", actor=session.account_id, subject=session.account_id
        )
    return redirect("/account", 303)


async def revoke_consent(request: web.Request) -> web.StreamResponse:
    hub, session, form = await _signed_in(request)
    assert session.account_id
    await hub.store.revoke_consent(session.account_id, form.get("client_id", ""))
    await hub.audit.record(
        "consent.revoked",
        actor=session.account_id,
        subject=session.account_id,
        client_id=form.get("client_id"),
    )
    return redirect("/account", 303)


async def end_session(hub: Hub, session_id: str, account_id: str | None) -> None:
    """End a session everywhere: its row, its refresh tokens, and the clients it signed in to
    (back-channel logout tokens, OIDC Back-Channel Logout 1.0 §2.4)."""
    found = await hub.store.session(session_id)
    await hub.store.end_session(session_id)
    await hub.store.revoke_session_tokens(session_id)
    if found is None or account_id is None:
        return
    for client_id in found.state.get("clients", []):
        client = await hub.store.client(client_id)
        if client is None or not client.spec.backchannel_logout_uri:
            continue
        now = int(time.time())
        token = hub.keys.sign(
            {
                "iss": hub.issuer,
                "aud": client_id,
                "iat": now,
                "exp": now + 120,
                "jti": secrets.token_urlsafe(16),
                "sub": account_id,
                "sid": hub.sid(session_id),
                "events": {BACKCHANNEL_EVENT: {}},
            },
            typ="logout+jwt",
        )
        task = asyncio.create_task(_deliver(client.spec.backchannel_logout_uri, token))
        _pending.add(task)
        task.add_done_callback(_pending.discard)


_pending: set[asyncio.Task[None]] = set()


async def _deliver(uri: str, token: str) -> None:
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
            http.post(uri, data={"logout_token": token}) as response,
        ):
            if response.status >= 400:
                log.warning("back-channel logout to %s answered %d", uri, response.status)
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.warning("back-channel logout to %s failed: %s", uri, exc)


async def logout(request: web.Request) -> web.StreamResponse:
    hub: Hub = request.app[HUB]
    params: dict[str, Any] = dict(request.query)
    if request.method == "POST":
        params.update({k: v for k, v in (await request.post()).items() if isinstance(v, str)})
    session = await load_session(request)
    client_id = params.get("client_id")
    hint = params.get("id_token_hint")
    hinted = False
    if hint:
        try:
            header = jwt.get_unverified_header(hint)
            key = hub.keys.public_keys().get(header.get("kid", ""))
            claims = (
                jwt.decode(
                    hint,
                    key,
                    algorithms=[hub.keys.alg],
                    issuer=hub.issuer,
                    options={
                        "verify_aud": False,
                        "verify_exp": False,
                    },  # §2: expired hints are fine
                )
                if key is not None
                else None
            )
        except jwt.PyJWTError:
            claims = None
        if claims is None:
            return render(
                request, "error.html", status=400, description="The id_token_hint is not valid."
            )
        client_id = client_id or (
            claims["aud"] if isinstance(claims["aud"], str) else claims["aud"][0]
        )
        hinted = session is not None and claims.get("sid") == hub.sid(session.id)
    back_to = params.get("post_logout_redirect_uri")
    if back_to:
        client = await hub.store.client(client_id or "")
        # RP-Initiated Logout §2: only registered URIs, matched exactly.
        if client is None or back_to not in client.spec.post_logout_redirect_uris:
            return render(
                request,
                "error.html",
                status=400,
                description="The post_logout_redirect_uri is not registered.",
            )
    confirmed = (
        request.method == "POST" and session is not None and csrf_ok(session, params.get("csrf"))
    )
    if session is not None and session.account_id and not (hinted or confirmed):
        # Without proof the client speaks for this session, ask the person (§2, §6: CSRF).
        hidden = [
            (k, v)
            for k, v in params.items()
            if k in ("post_logout_redirect_uri", "state", "client_id", "id_token_hint")
        ]
        return render(
            request,
            "message.html",
            session=session,
            heading="Sign out?",
            text="",
            form_action="/logout",
            hidden=hidden,
            button="Sign out",
        )
    if session is not None:
        await end_session(hub, session.id, session.account_id)
        await hub.audit.record(
            "logout", actor=session.account_id, subject=session.account_id, client_id=client_id
        )
    if back_to:
        state = params.get("state")
        extra = ("&" if "?" in back_to else "?") + urlencode({"state": state}) if state else ""
        response: web.StreamResponse = redirect(back_to + extra)
    else:
        response = render(
            request,
            "message.html",
            heading="",
            text=_signed_out(request),
            form_action="",
            hidden=[],
            button="",
        )
    response.del_cookie("cityplane_session", path="/")
    response.del_cookie("__Host-cityplane_session", path="/")
    return response


def _signed_out(request: web.Request) -> str:
    from identity.web.i18n import Translator, language

    return Translator(language(request))("signed_out")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/account", account_page)
    app.router.add_post("/account/sessions/revoke", revoke_session)
    app.router.add_post("/account/consents/revoke", revoke_consent)
    app.router.add_get("/logout", logout)
    app.router.add_post("/logout", logout)
