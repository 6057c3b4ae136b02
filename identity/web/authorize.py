"""The authorization endpoint (OIDC Core §3.1.2) and how a sign-in ends: with a code.

What a request asks for becomes a *flow* kept in the browser session: the target trust level
(the client's minimum, raised, never lowered, by `acr_values` or an essential `acr` in the
`claims` parameter, OIDC Core §5.5.1.1), `max_age` and `prompt`. The sign-in pages
(identity/web/login.py) then ask only for what the session lacks.
"""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import urlencode

from aiohttp import web
from authlib.oauth2.rfc6749.errors import OAuth2Error

from identity.hub import HUB, Hub
from identity.oidc.server import GrantContext, HubRequest
from identity.store import Account, Session
from identity.trust.levels import AccountFacts, TrustLevelUnreachable
from identity.web.session import (
    device_of,
    ensure_session,
    load_session,
    new_flow,
    redirect,
    render,
    save_flow,
    set_cookie,
    verifications,
)


class FlowError(Exception):
    """The request cannot go on; answered to the client's redirect URI with `error`."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error = error
        self.description = description


def facts_of(account: Account) -> AccountFacts:
    return AccountFacts(
        real_name_verified=account.real_name_verified_at is not None,
        real_name_at=account.real_name_verified_at,
    )


def requirements(hub: Hub, params: dict[str, str], min_level: int) -> tuple[int, int | None]:
    """(target level, max_age) of an authorization request; raises FlowError."""
    target = min_level
    levels = [hub.policy.level_of_acr(v) for v in params.get("acr_values", "").split()]
    known = [level for level in levels if level is not None]
    if known:
        # acr_values are voluntary and in order of preference (OIDC Core §3.1.2.1): take the
        # first one we know; it can only raise the client's minimum.
        target = max(target, known[0])
    if "claims" in params:
        try:
            claims = json.loads(params["claims"])
            acr = (claims.get("id_token") or {}).get("acr") or {}
        except (ValueError, AttributeError):
            raise FlowError(
                "invalid_request", "the claims parameter is not a JSON object"
            ) from None
        if isinstance(acr, dict) and acr.get("essential"):
            values = acr.get("values") or ([acr["value"]] if "value" in acr else [])
            wanted = [hub.policy.level_of_acr(str(v)) for v in values]
            reachable = [level for level in wanted if level is not None]
            if not reachable:
                # OIDC Core §5.5.1.1: an essential acr the OP cannot satisfy fails the request.
                raise FlowError(
                    "unmet_authentication_requirements",
                    f"none of the essential acr values {values} is offered here",
                )
            target = max(target, min(reachable))
    max_age = None
    if "max_age" in params:
        try:
            max_age = int(params["max_age"])
        except ValueError:
            raise FlowError(
                "invalid_request", "max_age must be a whole number of seconds"
            ) from None
        if max_age < 0:
            raise FlowError("invalid_request", "max_age must not be negative")
    return target, max_age


def error_redirect(params: dict[str, str], error: str, description: str) -> web.Response:
    query = {"error": error, "error_description": description}
    if params.get("state"):
        query["state"] = params["state"]
    uri = params["redirect_uri"]
    return redirect(f"{uri}{'&' if '?' in uri else '?'}{urlencode(query)}")


def error_page(request: web.Request, description: str, status: int = 400) -> web.Response:
    return render(request, "error.html", status=status, description=description)


async def authorize(request: web.Request) -> web.StreamResponse:
    hub: Hub = request.app[HUB]
    pairs = [(k, v) for k, v in request.query.items()]
    params = dict(pairs)
    session = await load_session(request)
    account = (
        await hub.store.account(session.account_id) if session and session.account_id else None
    )
    ctx = GrantContext(client=await hub.store.client(params.get("client_id", "")))
    req = HubRequest("GET", f"{hub.issuer}/authorize", request.headers, pairs)
    try:
        hub.server.run(ctx, hub.server.get_consent_grant, req, account)
    except OAuth2Error as error:
        if error.redirect_uri and ctx.client is not None:
            # Authlib only sets redirect_uri once the client and its URI are validated.
            return error_redirect(
                {**params, "redirect_uri": error.redirect_uri},
                error.error,
                error.description or error.error,
            )
        # RFC 6749 §4.1.2.1: never redirect to an unverified URI; tell the person instead.
        return error_page(request, error.description or error.error)
    assert ctx.client is not None
    if "request" in params or "request_uri" in params:
        return error_redirect(params, "request_not_supported", "request objects are not supported")
    try:
        target, max_age = requirements(hub, params, ctx.client.spec.min_trust_level)
    except FlowError as error:
        return error_redirect(params, error.error, error.description)
    prompts = set(params.get("prompt", "").split())
    session = session or await ensure_session(request)
    flow = {
        "params": pairs,
        "client_id": ctx.client.client_id,
        "target": target,
        "max_age": max_age,
        "prompt_login": "login" in prompts,
        "prompt_consent": "consent" in prompts,
        "started": time.time(),
    }
    fid = new_flow(session, flow)
    if "none" in prompts:
        # OIDC Core §3.1.2.1: no pages; answer at once with a code or the reason why not.
        decision = await next_step(hub, session, flow, account, device_of(request))
        if decision[0] == "done":
            assert account is not None
            return await finish(request, session, fid, account)
        save_flow(session, fid, None)
        await hub.store.save_session(session)
        reason = {
            "password": "login_required",
            "consent": "consent_required",
        }.get(decision[0], "interaction_required")
        return error_redirect(params, reason, "the user must interact with the hub")
    await hub.store.save_session(session)
    response = redirect(f"/login?flow={fid}")
    set_cookie(request, response, session)
    return response


def available_methods(account: Account, passkey_count: int) -> set[str]:
    methods = set()
    if account.password_hash:
        methods.add("pwd")
    if account.totp_secret:
        methods.add("otp")
    if account.phone:
        methods.add("sms")
    if passkey_count:
        methods.add("hwk")
    if account.real_name_verified_at:
        methods.add("face")  # the face is matched against the real-name identity
    return methods


async def next_step(
    hub: Hub,
    session: Session,
    flow: dict[str, Any],
    account: Account | None,
    device: str | None = None,
) -> tuple[str, Any]:
    """What the person must do next in this flow: ("password"|"choose"|<method>|"consent"|
    "done", detail). Raises FlowError when the target level is out of reach."""
    now = time.time()
    if account is None or (flow.get("prompt_login") and not flow.get("login_done")):
        return "password", None
    verified = verifications(session, device)
    passkeys = await hub.store.passkeys_of(account.id)
    max_age = _effective_max_age(flow, now)
    try:
        missing = hub.policy.missing_for(
            flow["target"],
            verified,
            facts_of(account),
            now,
            max_age,
            available=available_methods(account, len(passkeys)),
        )
    except TrustLevelUnreachable as exc:
        raise FlowError("unmet_authentication_requirements", str(exc)) from None
    if missing:
        options = sorted(set().union(*missing))
        if any(option == {"pwd"} or option >= {"pwd"} for option in missing) and (
            "pwd" in options and all("pwd" in option for option in missing)
        ):
            return "password", None  # the first factor itself has lapsed (max_age, decay)
        chosen = flow.get("method")
        if chosen in options:
            return str(chosen), options
        if len(options) == 1:
            return options[0], options
        return "choose", options
    if flow.get("client_id") and await _needs_consent(hub, flow, account):
        return "consent", None
    return "done", None


def _effective_max_age(flow: dict[str, Any], now: float) -> float | None:
    """max_age, widened to cover what was verified during this very flow: `max_age=0` means
    "authenticate again now" (OIDC Core §3.1.2.1), not "nothing ever counts"."""
    max_age = flow.get("max_age")
    if max_age is None:
        return None
    return max(float(max_age), now - float(flow.get("started", now)))


def requested_scopes(flow: dict[str, Any]) -> list[str]:
    return dict(flow["params"]).get("scope", "").split()


async def _needs_consent(hub: Hub, flow: dict[str, Any], account: Account) -> bool:
    if flow.get("consented"):
        return False
    if flow.get("prompt_consent") or account.organizations:
        return True  # asked again on request, and people who can act for an organization choose
    granted = await hub.store.consented_scopes(account.id, flow["client_id"])
    return not set(requested_scopes(flow)) <= granted


def auth_context(
    hub: Hub, session: Session, account: Account, flow: dict[str, Any], device: str | None = None
) -> dict[str, Any]:
    """acr, amr, auth_time, sid and org of the tokens this flow ends with."""
    now = time.time()
    verified = verifications(session, device)
    level = hub.policy.level(verified, facts_of(account), now)
    max_age = _effective_max_age(flow, now)
    counted = [v for v in verified if max_age is None or v.at >= now - max_age]
    context: dict[str, Any] = {
        "acr": hub.policy.acr(level) if level else None,
        "amr": hub.policy.amr(counted),
        # OIDC Core §2: when the End-User authentication occurred — the oldest verification
        # the level rests on, so `max_age` checks by relying parties stay conservative.
        "auth_time": int(min((v.at for v in counted), default=now)),
        "sid": hub.sid(session.id),
    }
    org = flow.get("org")
    membership = next((m for m in account.organizations if m.org_id == org), None)
    if membership is not None:
        context["org"] = membership.org_id
        context["org_roles"] = list(membership.roles)
    return context


async def finish(
    request: web.Request, session: Session, fid: str, account: Account
) -> web.StreamResponse:
    """Issue the authorization code and send the browser back to the client."""
    hub: Hub = request.app[HUB]
    flow = session.state["flows"][fid]
    pairs = [tuple(p) for p in flow["params"]]
    ctx = GrantContext(
        client=await hub.store.client(flow["client_id"]),
        account=account,
        session_id=session.id,
        auth=auth_context(hub, session, account, flow, device_of(request)),
    )
    req = HubRequest("GET", f"{hub.issuer}/authorize", request.headers, pairs)
    save_flow(session, fid, None)
    try:
        grant = hub.server.run(ctx, hub.server.get_consent_grant, req, account)
    except OAuth2Error as error:  # the client changed (e.g. deleted) while the person signed in
        await hub.store.save_session(session)
        return error_page(request, error.description or error.error)
    status, _, headers = hub.server.run(
        ctx, hub.server.create_authorization_response, req, account, grant
    )
    await hub.store.write(ctx.writes)
    clients = set(session.state.get("clients", []))
    clients.add(flow["client_id"])
    session.state["clients"] = sorted(clients)
    await hub.store.save_session(session)
    await hub.audit.record(
        "login.authorized",
        actor=account.id,
        subject=account.id,
        client_id=flow["client_id"],
        ip=request.remote,
        acr=ctx.auth.get("acr"),
        amr=ctx.auth.get("amr"),
        org=ctx.auth.get("org"),
    )
    location = dict(headers).get("Location", "/")
    response = redirect(location) if status == 302 else error_page(request, "authorization failed")
    set_cookie(request, response, session)
    return response
