"""Demo accounts at every trust level and demo clients, for `cityplane up` (idempotent: an
existing data directory keeps its accounts; client secrets are rotated so they can be shown)."""

from __future__ import annotations

import time
from typing import Any

import yaml

from identity.clients import ClientSpec
from identity.hub import Hub
from identity.store import DuplicateError
from identity.trust.resident_id import check_character, parse_resident_id

DEMO_ORG = "org-transport"
# Fixed so the printed instructions stay true across restarts (demo data only, never production).
TOTP_SECRETS = {
    "citizen2": "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PX2",
    "citizen3": "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PX3",
    "citizen4": "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PX4",
    "operator": "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PX5",
}


def _resident_id(first17: str) -> str:
    return first17 + check_character(first17)


DEMO_ACCOUNTS: list[dict[str, Any]] = [
    {"username": "citizen1", "name": "Li Lei", "password": "demo-citizen-1", "level": 1},
    {
        "username": "citizen2",
        "name": "Han Meimei",
        "password": "demo-citizen-2",
        "level": 2,
        "phone": "+8613800000002",
        "resident_id": _resident_id("11010119900307002"),
        "real_name": "韩梅梅",
    },
    {
        "username": "citizen3",
        "name": "Wang Fang",
        "password": "demo-citizen-3",
        "level": 3,
        "phone": "+8613800000003",
        "resident_id": _resident_id("31010119851112003"),
        "real_name": "王芳",
        "verified": True,
    },
    {
        "username": "citizen4",
        "name": "Zhang Wei",
        "password": "demo-citizen-4",
        "level": 4,
        "phone": "+8613800000004",
        "resident_id": _resident_id("44030119780521004"),
        "real_name": "张伟",
        "verified": True,
    },
    {
        "username": "operator",
        "name": "Chen Jing (Transport Bureau)",
        "password": "demo-operator-1",
        "level": 2,
        "phone": "+8613800000005",
        "org_roles": ["admin", "developer"],
    },
]


def demo_clients(gateway_url: str | None = None) -> dict[str, ClientSpec]:
    return {
        "demo-web": ClientSpec(
            name="Demo city web app",
            redirect_uris=["http://localhost:8765/callback", "http://127.0.0.1:8765/callback"],
            post_logout_redirect_uris=["http://localhost:8765/"],
            scopes=[
                "openid",
                "profile",
                "email",
                "phone",
                "offline_access",
                "bus:read",
                "permits:write",
                "registry:read",
                "registry:write",
            ],
            grant_types=["authorization_code", "refresh_token", "client_credentials"],
            owner=DEMO_ORG,
        ),
        "demo-spa": ClientSpec(
            name="Demo single-page app",
            redirect_uris=["http://localhost:8766/callback", "http://127.0.0.1:8766/callback"],
            scopes=["openid", "profile", "offline_access", "bus:read"],
            grant_types=["authorization_code", "refresh_token"],
            public=True,
        ),
    }


async def seed_demo(hub: Hub) -> dict[str, Any]:
    """Create what is missing; return the demo.json part for accounts and clients."""
    registry_file = hub.realname.path if hasattr(hub.realname, "path") else None
    records = [
        {"name": a["real_name"], "id": a["resident_id"]}
        for a in DEMO_ACCOUNTS
        if "resident_id" in a
    ]
    if registry_file is not None and not registry_file.exists():
        registry_file.write_text(
            "# Reference real-name authority for development (name + resident ID).\n"
            + yaml.safe_dump({"records": records}, allow_unicode=True)
        )
    if not await hub.store.organization_exists(DEMO_ORG):
        await hub.store.create_organization(DEMO_ORG, "Municipal Transport Bureau")
    accounts = []
    for spec in DEMO_ACCOUNTS:
        try:
            account = await hub.store.create_account(
                spec["username"],
                spec["name"],
                password_hash=await hub.hasher.hash(spec["password"]),
                phone=spec.get("phone"),
                email=f"{spec['username']}@demo.city.example",
            )
            secret = TOTP_SECRETS.get(spec["username"])
            if secret:
                await hub.store.update_account(account.id, totp_secret=secret)
            if spec.get("verified"):
                resident = parse_resident_id(spec["resident_id"])
                await hub.store.update_account(
                    account.id,
                    real_name=spec["real_name"],
                    resident_id_masked=resident.masked(),
                    resident_fingerprint=resident.fingerprint(hub.pepper),
                    real_name_verified_at=time.time(),
                )
            if spec.get("org_roles"):
                await hub.store.add_member(DEMO_ORG, account.id, spec["org_roles"])
        except DuplicateError:
            pass
        entry: dict[str, Any] = {
            "username": spec["username"],
            "password": spec["password"],
            "level": spec["level"],
        }
        if spec["username"] in TOTP_SECRETS:
            entry["totp_secret"] = TOTP_SECRETS[spec["username"]]
        if spec.get("phone"):
            entry["phone"] = spec["phone"]
            entry["sms_outbox"] = str(getattr(hub.sms, "path", ""))
        if "resident_id" in spec and not spec.get("verified"):
            entry["real_name"] = spec["real_name"]
            entry["resident_id"] = spec["resident_id"]
        if spec.get("level", 0) >= 4:
            entry["face"] = "any JPEG or PNG photo matches (development face matcher)"
        if spec.get("org_roles"):
            entry["organization"] = DEMO_ORG
        accounts.append(entry)
    clients = []
    for client_id, client_spec in demo_clients().items():
        _, secret, created = await hub.store.put_client(client_id, client_spec)
        if not created and not client_spec.public:
            secret = await hub.store.rotate_client_secret(client_id)
        clients.append(
            {
                "client_id": client_id,
                "client_secret": secret,
                "redirect_uris": client_spec.redirect_uris,
                "public": client_spec.public,
            }
        )
    hub.demo = {"accounts": accounts, "clients": clients}
    return hub.demo
