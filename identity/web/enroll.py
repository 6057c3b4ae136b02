"""Adding a sign-in method from the account page: an authenticator app (TOTP, RFC 6238).

Changing what protects an account needs a recent sign-in: older than `RECENT` seconds, the
person signs in again first (the same flow as any relying party's `max_age`).
"""

from __future__ import annotations

import time

from aiohttp import web

from identity.hub import HUB, Hub
from identity.store import Session
from identity.trust.otp import new_totp_secret, provisioning_uri, qr_svg, verify_totp
from identity.web.session import (
    csrf_ok,
    ensure_session,
    load_session,
    new_flow,
    redirect,
    render,
    set_cookie,
    verifications,
)

RECENT = 900.0  # seconds


async def _recent_session(request: web.Request, return_to: str) -> Session | web.Response:
    """The signed-in session if it verified something in the last RECENT seconds, else a
    redirect through the sign-in pages back to `return_to`."""
    hub: Hub = request.app[HUB]
    session = await load_session(request)
    now = time.time()
    if (
        session is not None
        and session.account_id
        and any(now - v.at <= RECENT for v in verifications(session))
    ):
        return session
    session = session or await ensure_session(request)
    fid = new_flow(
        session,
        {"params": [], "client_id": None, "target": 1, "max_age": 0, "return_to": return_to},
    )
    await hub.store.save_session(session)
    response = redirect(f"/login?flow={fid}")
    set_cookie(request, response, session)
    return response


async def totp_page(request: web.Request) -> web.StreamResponse:
    hub: Hub = request.app[HUB]
    session = await _recent_session(request, "/account/totp")
    if isinstance(session, web.Response):
        return session
    account = await hub.store.account(session.account_id or "")
    assert account is not None
    pending = session.state.get("totp_pending") or new_totp_secret()
    session.state["totp_pending"] = pending
    await hub.store.save_session(session)
    uri = provisioning_uri(pending, account.username, "CityPlane")
    return render(
        request,
        "totp.html",
        session=session,
        secret=pending,
        qr=qr_svg(uri),
        message=request.query.get("failed") and "That code is not right or has expired.",
    )


async def totp_confirm(request: web.Request) -> web.StreamResponse:
    hub: Hub = request.app[HUB]
    form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
    session = await _recent_session(request, "/account/totp")
    if isinstance(session, web.Response):
        return session
    pending = session.state.get("totp_pending")
    if not pending or not csrf_ok(session, form.get("csrf")):
        return redirect("/account/totp", 303)
    step = verify_totp(pending, form.get("code", ""), now=time.time(), last_step=None)
    if step is None:
        return redirect("/account/totp?failed=1", 303)
    assert session.account_id
    await hub.store.update_account(session.account_id, totp_secret=pending, totp_last_step=step)
    session.state.pop("totp_pending", None)
    await hub.store.save_session(session)
    await hub.audit.record(
        "account.totp_enrolled", actor=session.account_id, subject=session.account_id
    )
    return redirect("/account", 303)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/account/totp", totp_page)
    app.router.add_post("/account/totp", totp_confirm)
