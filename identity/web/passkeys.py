"""Passkey sign-in and registration endpoints (the JSON contract of static/passkey.js).

Challenges are single-use: kept in the session, removed before verification. A passkey with
user verification is two factors, so it counts as `hwk` (trust level 2 by default).
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import asdict
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from cityplane.problem import Problem
from identity.hub import HUB, Hub
from identity.store import Session
from identity.trust.passkey import (
    PasskeyError,
    RelyingParty,
    StoredPasskey,
    authentication_options,
    credential_id_of,
    registration_options,
    user_handle_of,
    verify_authentication,
    verify_registration,
)
from identity.web.session import (
    add_verification,
    csrf_ok,
    flow_of,
    load_session,
    save_flow,
    set_cookie,
    sign_in,
)

CHALLENGE_TTL = 300.0


def relying_party(hub: Hub) -> RelyingParty:
    parts = urlsplit(hub.issuer)
    return RelyingParty(
        id=parts.hostname or "localhost",
        name="CityPlane",
        origins=(f"{parts.scheme}://{parts.netloc}",),
    )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def to_record(passkey: StoredPasskey) -> dict[str, Any]:
    record = asdict(passkey)
    record["credential_id"] = _b64(passkey.credential_id)
    record["public_key"] = _b64(passkey.public_key)
    return record


def from_record(record: dict[str, Any]) -> StoredPasskey:
    return StoredPasskey(
        **{
            **record,
            "credential_id": _unb64(record["credential_id"]),
            "public_key": _unb64(record["public_key"]),
        }
    )


async def _session(request: web.Request) -> Session:
    session = await load_session(request)
    if session is None:
        raise Problem(401, "no-session", "the sign-in session has expired; reload the page")
    if not csrf_ok(session, request.headers.get("X-CSRF-Token")):
        raise Problem(403, "csrf", "the page expired; reload it and try again")
    return session


def _take_challenge(session: Session, kind: str) -> bytes:
    stored = session.state.pop(f"passkey_{kind}", None)
    if not stored or time.time() - stored["at"] > CHALLENGE_TTL:
        raise Problem(400, "challenge", "this passkey request expired; try again")
    return _unb64(stored["challenge"])


def _options_response(request: web.Request, session: Session, options: str) -> web.Response:
    response = web.Response(text=options, content_type="application/json")
    set_cookie(request, response, session)
    return response


async def login_options(request: web.Request) -> web.Response:
    hub: Hub = request.app[HUB]
    session = await _session(request)
    allow: list[bytes] = []
    if session.account_id:  # step-up: this account's passkeys only
        allow = [
            _unb64(r["credential_id"]) for r in await hub.store.passkeys_of(session.account_id)
        ]
    options, challenge = authentication_options(relying_party(hub), allow=allow)
    session.state["passkey_login"] = {"challenge": _b64(challenge), "at": time.time()}
    await hub.store.save_session(session)
    return _options_response(request, session, options)


async def login_verify(request: web.Request) -> web.Response:
    hub: Hub = request.app[HUB]
    session = await _session(request)
    fid = request.query.get("flow", "")
    flow = flow_of(session, fid)
    if flow is None:
        raise Problem(400, "expired-flow", "this sign-in expired; start again from the app")
    challenge = _take_challenge(session, "login")
    await hub.store.save_session(session)  # the challenge is spent whatever happens next
    try:
        credential = json.loads(await request.read())
        found = await hub.store.passkey(credential_id_of(credential))
        if found is None:
            raise PasskeyError("credential", "This passkey is not registered here.")
        account_id, record = found
        if session.account_id and session.account_id != account_id:
            raise PasskeyError("user_handle", "This passkey belongs to a different account.")
        updated = verify_authentication(
            relying_party(hub),
            credential_json=credential,
            challenge=challenge,
            stored=from_record(record),
            now=time.time(),
            expected_user_handle=account_id.encode(),
        )
    except PasskeyError as exc:
        hub.metrics.logins.labels("hwk", "failed").inc()
        await hub.audit.record("login.failed", method="hwk", ip=request.remote, reason=exc.reason)
        raise Problem(400, "passkey", str(exc)) from None
    except ValueError:
        raise Problem(400, "malformed", "the passkey answer is not JSON") from None
    _ = user_handle_of  # the account comes from the stored credential, checked against it
    await hub.store.update_passkey(updated.credential_id, to_record(updated))
    session = await sign_in(request, session, account_id)
    add_verification(session, "hwk", time.time())
    flow["login_done"] = True
    flow.pop("method", None)
    save_flow(session, fid, flow)
    await hub.store.save_session(session)
    await hub.audit.record("login.passkey", actor=account_id, subject=account_id, ip=request.remote)
    hub.metrics.logins.labels("hwk", "ok").inc()
    response = web.json_response({"redirect": f"/login?flow={fid}"})
    set_cookie(request, response, session)
    return response


async def register_options(request: web.Request) -> web.Response:
    hub: Hub = request.app[HUB]
    session = await _session(request)
    account = await hub.store.account(session.account_id) if session.account_id else None
    if account is None:
        raise Problem(401, "sign-in-required", "sign in before adding a passkey")
    existing = [_unb64(r["credential_id"]) for r in await hub.store.passkeys_of(account.id)]
    options, challenge = registration_options(
        relying_party(hub),
        user_id=account.id.encode(),
        user_name=account.username,
        display_name=account.display_name,
        exclude=existing,
    )
    session.state["passkey_register"] = {"challenge": _b64(challenge), "at": time.time()}
    await hub.store.save_session(session)
    return _options_response(request, session, options)


async def register_verify(request: web.Request) -> web.Response:
    hub: Hub = request.app[HUB]
    session = await _session(request)
    if not session.account_id:
        raise Problem(401, "sign-in-required", "sign in before adding a passkey")
    challenge = _take_challenge(session, "register")
    await hub.store.save_session(session)
    try:
        credential = json.loads(await request.read())
        passkey = verify_registration(
            relying_party(hub), credential_json=credential, challenge=challenge, now=time.time()
        )
    except PasskeyError as exc:
        raise Problem(400, "passkey", str(exc)) from None
    except ValueError:
        raise Problem(400, "malformed", "the passkey answer is not JSON") from None
    await hub.store.add_passkey(session.account_id, passkey.credential_id, to_record(passkey))
    await hub.audit.record(
        "account.passkey_added", actor=session.account_id, subject=session.account_id
    )
    return web.json_response({"redirect": "/account"})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/login/passkey/options", login_options)
    app.router.add_post("/login/passkey", login_verify)
    app.router.add_post("/account/passkeys/options", register_options)
    app.router.add_post("/account/passkeys", register_verify)
