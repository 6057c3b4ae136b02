"""Sign-in through an upstream provider (identity/federation.py): out to its authorization
endpoint, back to `/login/federated/callback`, then on with the flow that started it."""

from __future__ import annotations

import hashlib
import time

from aiohttp import web

from identity.federation import FederationError
from identity.hub import HUB, Hub
from identity.web.authorize import error_page
from identity.web.session import (
    add_verification,
    flow_of,
    load_session,
    redirect,
    save_flow,
    set_cookie,
    sign_in,
)


def callback_uri(hub: Hub) -> str:
    return f"{hub.issuer}/login/federated/callback"


async def start(request: web.Request) -> web.StreamResponse:
    hub: Hub = request.app[HUB]
    upstream = hub.upstreams.get(request.match_info["provider"])
    fid = request.query.get("flow", "")
    session = await load_session(request)
    if upstream is None or session is None or flow_of(session, fid) is None:
        return error_page(request, "This sign-in expired or names an unknown provider.")
    try:
        url, kept = await upstream.start(hub.http(), callback_uri(hub))
    except FederationError as exc:
        return error_page(request, str(exc), 502)
    session.state["federation"] = {**kept, "flow": fid, "at": time.time()}
    await hub.store.save_session(session)
    response = redirect(url)
    set_cookie(request, response, session)
    return response


async def callback(request: web.Request) -> web.StreamResponse:
    hub: Hub = request.app[HUB]
    session = await load_session(request)
    kept = session.state.pop("federation", None) if session is not None else None
    if session is None or not kept or request.query.get("state") != kept["state"]:
        # OIDC Core §3.1.2.7 / RFC 6749 §10.12: a callback we did not start is refused.
        return error_page(request, "This sign-in answer does not belong to a sign-in here.")
    await hub.store.save_session(session)  # the state is spent whatever happens next
    if time.time() - kept["at"] > 600:
        return error_page(request, "The sign-in at the other provider took too long.")
    upstream = hub.upstreams.get(kept["provider"])
    fid = kept["flow"]
    flow = flow_of(session, fid)
    if upstream is None or flow is None:
        return error_page(request, "This sign-in expired; start again from the app.")
    if "error" in request.query:
        return error_page(request, f"{upstream.config.name}: {request.query['error']}")
    try:
        claims = await upstream.finish(
            hub.http(),
            code=request.query.get("code", ""),
            kept=kept,
            redirect_uri=callback_uri(hub),
        )
    except FederationError as exc:
        await hub.audit.record("login.failed", method="fed", ip=request.remote, reason=str(exc))
        return error_page(request, str(exc), 502)
    level = upstream.config.level_of(claims.get("acr"))
    subject = str(claims["sub"])
    tag = hashlib.sha256(f"{upstream.config.issuer}|{subject}".encode()).hexdigest()[:12]
    account_id = await hub.store.link_federated(
        upstream.config.issuer,
        subject,
        username=f"{upstream.config.id}-{tag}",
        display_name=str(claims.get("name") or claims.get("preferred_username") or subject)[:128],
    )
    session = await sign_in(request, session, account_id)
    add_verification(session, "fed", time.time(), level)
    flow["login_done"] = True
    save_flow(session, fid, flow)
    await hub.store.save_session(session)
    await hub.audit.record(
        "login.federated",
        actor=account_id,
        subject=account_id,
        ip=request.remote,
        provider=upstream.config.id,
        upstream_acr=claims.get("acr"),
        level=level,
    )
    hub.metrics.logins.labels("fed", "ok").inc()
    response = redirect(f"/login?flow={fid}")
    set_cookie(request, response, session)
    return response


def add_routes(app: web.Application) -> None:
    app.router.add_get("/login/federated/callback", callback)
    app.router.add_get("/login/federated/{provider}", start)
