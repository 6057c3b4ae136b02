"""The sign-in pages: password, the step-up methods, consent.

`GET /login?flow=…` shows what `next_step` says is missing; each `POST /login` verifies one
thing, records it in the session, and redirects back (303, so a reload never re-submits).
Only the missing method is asked for: a level-1 session asked for level 3 sees the second
factor, then real-name verification, nothing else.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from identity.hub import HUB, Hub
from identity.store import Account, DuplicateError, Session
from identity.trust.otp import verify_totp
from identity.trust.realname import AuthorityUnavailable
from identity.trust.realperson import FaceResultInvalid, verify_face_result
from identity.trust.resident_id import InvalidResidentId, parse_resident_id
from identity.trust.sms import SmsChallenge, mask_phone
from identity.web.authorize import (
    FlowError,
    authorize,
    error_page,
    error_redirect,
    facts_of,
    finish,
    next_step,
    requested_scopes,
)
from identity.web.i18n import Translator, language
from identity.web.session import (
    add_verification,
    csrf_ok,
    device_of,
    flow_of,
    load_session,
    redirect,
    render,
    save_flow,
    set_cookie,
    sign_in,
    verifications,
)

MAX_PHOTO = 5 * 1024 * 1024


async def _account(hub: Hub, session: Session) -> Account | None:
    return await hub.store.account(session.account_id) if session.account_id else None


async def login_page(request: web.Request) -> web.StreamResponse:
    hub: Hub = request.app[HUB]
    fid = request.query.get("flow", "")
    session = await load_session(request)
    flow = flow_of(session, fid)
    if session is None or flow is None:
        return error_page(request, _t(request, "expired_flow"))
    if request.query.get("method"):
        flow["method"] = request.query["method"]
        save_flow(session, fid, flow)
    account = await _account(hub, session)
    try:
        step, options = await next_step(hub, session, flow, account, device_of(request))
    except FlowError as error:
        save_flow(session, fid, None)
        await hub.store.save_session(session)
        if not flow.get("client_id"):
            return error_page(request, error.description)
        return error_redirect(dict(flow["params"]), error.error, error.description)
    if step == "done":
        assert account is not None
        if not flow.get("client_id"):  # signing in to the hub itself (the account page)
            save_flow(session, fid, None)
            await hub.store.save_session(session)
            done = redirect(flow.get("return_to") or "/account")
            set_cookie(request, done, session)
            return done
        return await finish(request, session, fid, account)
    if step == "sms" and account is not None and not _pending_sms(session):
        await _send_sms(hub, session, account)
    message = flow.pop("message", None)
    save_flow(session, fid, flow)
    await hub.store.save_session(session)
    client = await hub.store.client(flow["client_id"]) if flow.get("client_id") else None
    level_now = (
        hub.policy.level(verifications(session, device_of(request)), facts_of(account), time.time())
        if account
        else 0
    )
    return render(
        request,
        "login.html",
        session=session,
        step=step,
        options=options or [],
        flow=fid,
        client=client.spec.name if client else "",
        target=flow["target"],
        target_acr=hub.policy.acr(flow["target"]),
        level_now=level_now,
        account=account,
        message=message,
        phone=mask_phone(account.phone) if account and account.phone else "",
        scopes=requested_scopes(flow),
        organizations=account.organizations if account else [],
        providers=[(u.config.id, u.config.name) for u in hub.upstreams.values()],
    )


def _t(request: web.Request, key: str, **values: object) -> str:
    return Translator(language(request))(key, **values)


def _pending_sms(session: Session) -> bool:
    data = session.state.get("sms")
    if not data:
        return False
    challenge = SmsChallenge.from_dict(data)
    return not challenge.exhausted and challenge.expires_at > time.time()


async def _send_sms(hub: Hub, session: Session, account: Account) -> None:
    assert account.phone
    challenge, code = SmsChallenge.issue(account.phone, now=time.time())
    session.state["sms"] = challenge.to_dict()
    await hub.sms.send(account.phone, f"CityPlane code: {code} (valid 5 minutes)")


async def login_action(request: web.Request) -> web.StreamResponse:
    hub: Hub = request.app[HUB]
    data = await request.post()
    form = {k: v for k, v in data.items() if isinstance(v, str)}
    fid = form.get("flow", "")
    session = await load_session(request)
    flow = flow_of(session, fid)
    if session is None or flow is None:
        return error_page(request, _t(request, "expired_flow"))
    if not csrf_ok(session, form.get("csrf")):
        return error_page(request, "The form expired; reload the page and try again.", 403)
    action = form.get("action", "")
    handler = ACTIONS.get(action)
    if handler is None:
        return error_page(request, f"unknown action {action!r}")
    account = await _account(hub, session)
    if action not in ("password", "deny") and account is None:
        return error_page(request, _t(request, "expired_flow"))
    outcome = await handler(Attempt(request, hub, session, flow, account, form, data))
    if isinstance(outcome, web.StreamResponse):
        return outcome
    session, message = outcome
    if message:
        flow["message"] = message
    flow.pop("method", None) if not message else None
    save_flow(session, fid, flow)
    await hub.store.save_session(session)
    response = redirect(f"/login?flow={fid}", 303)
    set_cookie(request, response, session)
    return response


Outcome = tuple[Session, str | None] | web.StreamResponse


@dataclass(slots=True)
class Attempt:
    """One verification the person submitted: what the action handlers work with."""

    request: web.Request
    hub: Hub
    session: Session
    flow: dict[str, Any]
    account: Any  # Account, or None before the password step
    form: dict[str, str]
    data: Any  # the raw multipart/form data (the face photo)


async def _password(a: Attempt) -> Outcome:
    username = a.form.get("username", "").strip()[:64]
    password = a.form.get("password", "")[:1024]
    ip = a.request.remote or "?"
    decision = await a.hub.throttle.check(username or None, ip)
    if not decision.allowed:
        a.hub.metrics.logins.labels("pwd", "throttled").inc()
        return a.session, _t(a.request, "throttled", seconds=int(decision.retry_after) + 1)
    found = await a.hub.store.account_by_username(username) if username else None
    if found is None or not found.password_hash:
        await a.hub.hasher.verify_missing_user(password)  # same time as a wrong password
        ok = False
    else:
        ok = await a.hub.hasher.verify(found.password_hash, password)
    if not ok or found is None:
        await a.hub.throttle.failed(username or None, ip)
        await a.hub.audit.record("login.failed", actor=username, ip=ip, method="pwd")
        a.hub.metrics.logins.labels("pwd", "failed").inc()
        return a.session, _t(a.request, "bad_login")
    await a.hub.throttle.succeeded(username, ip)
    if found.password_hash and a.hub.hasher.needs_rehash(found.password_hash):
        await a.hub.store.update_account(found.id, password_hash=await a.hub.hasher.hash(password))
    a.session = await sign_in(a.request, a.session, found.id)
    add_verification(a.session, "pwd", time.time())
    a.flow["login_done"] = True
    await a.hub.audit.record("login.password", actor=found.id, subject=found.id, ip=ip)
    a.hub.metrics.logins.labels("pwd", "ok").inc()
    return a.session, None


def _factor_key(a: Attempt) -> str:
    # Second factors are throttled like passwords (same policy), per account: a 6-digit code
    # has 10^6 values, and SMS "resend" would otherwise give fresh attempts without end.
    return f"second-factor:{a.account.id}"


async def _factor_throttled(a: Attempt) -> str | None:
    decision = await a.hub.throttle.check(_factor_key(a), a.request.remote or "?")
    if decision.allowed:
        return None
    return _t(a.request, "throttled", seconds=int(decision.retry_after) + 1)


async def _otp(a: Attempt) -> Outcome:
    if message := await _factor_throttled(a):
        return a.session, message
    now = time.time()
    step = verify_totp(
        a.account.totp_secret or "",
        a.form.get("code", ""),
        now=now,
        last_step=a.account.totp_last_step,
    )
    if step is None or not await a.hub.store.claim_totp_step(a.account.id, step):
        await a.hub.throttle.failed(_factor_key(a), a.request.remote or "?")
        a.hub.metrics.logins.labels("otp", "failed").inc()
        await a.hub.audit.record(
            "stepup.failed", actor=a.account.id, subject=a.account.id, method="otp"
        )
        return a.session, _t(a.request, "bad_code")
    await a.hub.throttle.succeeded(_factor_key(a), a.request.remote or "?")
    return await _stepped_up(a.hub, a.session, a.account, "otp", a.request)


async def _sms(a: Attempt) -> Outcome:
    if message := await _factor_throttled(a):
        return a.session, message
    if a.form.get("resend"):
        await a.hub.throttle.failed(_factor_key(a), a.request.remote or "?")  # a resend costs
        await _send_sms(a.hub, a.session, a.account)
        return a.session, None
    raw = a.session.state.get("sms")
    challenge = SmsChallenge.from_dict(raw) if raw else None
    if challenge is None or not challenge.verify(a.form.get("code", ""), now=time.time()):
        if challenge is not None:
            a.session.state["sms"] = challenge.to_dict()
        await a.hub.throttle.failed(_factor_key(a), a.request.remote or "?")
        a.hub.metrics.logins.labels("sms", "failed").inc()
        return a.session, _t(a.request, "bad_code")
    await a.hub.throttle.succeeded(_factor_key(a), a.request.remote or "?")
    a.session.state.pop("sms", None)
    return await _stepped_up(a.hub, a.session, a.account, "sms", a.request)


async def _realname(a: Attempt) -> Outcome:
    name = a.form.get("name", "").strip()
    try:
        resident = parse_resident_id(a.form.get("resident_id", ""))
    except InvalidResidentId as exc:
        return a.session, str(exc)
    try:
        result = await a.hub.realname.verify(name, resident)
    except AuthorityUnavailable:
        return a.session, "The real-name authority cannot be reached; try again later."
    if not result.matched:
        await a.hub.audit.record("realname.failed", actor=a.account.id, subject=a.account.id)
        return a.session, result.reason or "The name and ID number do not match."
    try:
        await a.hub.store.update_account(
            a.account.id,
            real_name=name,
            resident_id_masked=resident.masked(),
            resident_fingerprint=resident.fingerprint(a.hub.pepper),
            real_name_verified_at=time.time(),
        )
    except DuplicateError as exc:
        return a.session, str(exc)
    await a.hub.audit.record(
        "realname.verified", actor=a.account.id, subject=a.account.id, authority=result.authority
    )
    return a.session, None


async def _face(a: Attempt) -> Outcome:
    if device_of(a.request) is None:
        return a.session, "Face verification is bound to this device: allow cookies and reload."
    photo = a.data.get("photo")
    image = photo.file.read(MAX_PHOTO + 1) if hasattr(photo, "file") else b""
    if not image or len(image) > MAX_PHOTO:
        return a.session, "Choose a photo (JPEG or PNG, at most 5 MB)."
    nonce = secrets.token_urlsafe(16)
    token = await a.hub.face.match(
        subject=a.account.id,
        resident_id_fingerprint=a.account.resident_fingerprint or "",
        image=image,
        nonce=nonce,
    )
    try:
        result = verify_face_result(
            token, keys=a.hub.face_keys, subject=a.account.id, nonce=nonce, now=time.time()
        )
    except FaceResultInvalid as exc:
        return a.session, f"The face match could not be trusted: {exc}"
    if not result.matched:
        await a.hub.audit.record(
            "stepup.failed", actor=a.account.id, subject=a.account.id, method="face"
        )
        return a.session, "The face did not match."
    return await _stepped_up(a.hub, a.session, a.account, "face", a.request)


async def _stepped_up(
    hub: Hub, session: Session, account: Account, method: str, request: web.Request
) -> Outcome:
    add_verification(session, method, time.time(), device=device_of(request))
    hub.metrics.logins.labels(method, "ok").inc()
    await hub.audit.record(
        "login.stepup", actor=account.id, subject=account.id, method=method, ip=request.remote
    )
    return session, None


async def _allow(a: Attempt) -> Outcome:
    org = a.form.get("org") or None
    if org and not any(m.org_id == org for m in a.account.organizations):
        return a.session, "You are not a member of that organization."
    scopes = set(requested_scopes(a.flow))
    await a.hub.store.grant_consent(a.account.id, a.flow["client_id"], scopes)
    a.flow["consented"] = True
    a.flow["org"] = org
    await a.hub.audit.record(
        "consent.granted",
        actor=a.account.id,
        subject=a.account.id,
        client_id=a.flow["client_id"],
        scopes=sorted(scopes),
        org=org,
    )
    return a.session, None


async def _deny(a: Attempt) -> Outcome:
    save_flow(a.session, a.form.get("flow", ""), None)
    await a.hub.store.save_session(a.session)
    if a.account is not None:
        await a.hub.audit.record(
            "consent.denied",
            actor=a.account.id,
            subject=a.account.id,
            client_id=a.flow["client_id"],
        )
    return error_redirect(dict(a.flow["params"]), "access_denied", "the user did not allow access")


ACTIONS: dict[str, Any] = {
    "password": _password,
    "otp": _otp,
    "sms": _sms,
    "realname": _realname,
    "face": _face,
    "allow": _allow,
    "deny": _deny,
}


def add_routes(app: web.Application) -> None:
    app.router.add_get("/authorize", authorize)
    app.router.add_get("/login", login_page)
    app.router.add_post("/login", login_action)
