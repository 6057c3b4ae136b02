"""Who may do what to which service (docs/adr/0010-registry-ownership.md).

- `registry:admin` (and the bootstrap token) manage every service.
- `registry:write` manages the services whose `spec.owner` is the token's `org`: creates them
  (the owner defaults to the token's `org`), replaces, deletes, moves them through the
  lifecycle, and registers their instances. A different owner is a 403 that says why.
- `registry:read` (implied by write) reads and watches; other organizations' **drafts** are
  invisible to it: absent from lists, snapshots and the watch stream, a 404 when asked for by
  name. A write to such a name is a 403 that names neither the owner nor anything else (the
  name itself is taken: one namespace, so that much cannot be hidden).

The store calls `Authority.admit` inside the write transaction, on the row it is about to
change, so the check and the write see the same owner.
"""

from __future__ import annotations

from typing import Any

from cityplane.problem import Problem
from registry.auth import ADMIN, ADMIN_SCOPE, READ_SCOPE, REALM, WRITE_SCOPE, Principal
from registry.errors import not_found

# Actions `Authority.admit` knows; creating is the only one that may find no current service.
CREATE, REPLACE, DELETE = "create", "replace", "delete"
LIFECYCLE, INSTANCES = "lifecycle", "instances"


def insufficient_scope(scope: str, detail: str) -> Problem:
    # RFC 6750 §3.1: 403 with the scope the request needs.
    challenge = f'{REALM}, error="insufficient_scope", scope="{scope}"'
    return Problem(403, "insufficient-scope", detail, headers={"WWW-Authenticate": challenge})


def not_owner(detail: str) -> Problem:
    return Problem(403, "not-owner", detail)


def _owner(document: dict[str, Any]) -> str | None:
    owner = document["spec"].get("owner")
    return owner if isinstance(owner, str) else None


class Authority:
    """What one principal may do: built per request, asked by handlers and the store."""

    __slots__ = ("principal",)

    def __init__(self, principal: Principal) -> None:
        self.principal = principal

    @property
    def admin(self) -> bool:
        return self.principal.admin

    def require_read(self) -> None:
        if not self.principal.reads:
            raise insufficient_scope(
                f"{READ_SCOPE} {WRITE_SCOPE} {ADMIN_SCOPE}",
                f"reading the registry needs scope {READ_SCOPE}",
            )

    def require_write(self) -> None:
        if not self.principal.writes:
            raise insufficient_scope(
                f"{WRITE_SCOPE} {ADMIN_SCOPE}", f"changing the registry needs scope {WRITE_SCOPE}"
            )

    def require_admin(self, what: str) -> None:
        if not self.principal.admin:
            raise insufficient_scope(ADMIN_SCOPE, f"{what} needs scope {ADMIN_SCOPE}")

    def owns(self, document: dict[str, Any]) -> bool:
        org = self.principal.organization
        return org is not None and _owner(document) == org

    def sees(self, document: dict[str, Any]) -> bool:
        """Drafts are their owner's work in progress; everything else is the city's catalogue."""
        return (
            self.principal.admin
            or document["spec"].get("lifecycle", "published") != "draft"
            or self.owns(document)
        )

    def admit(
        self,
        action: str,
        name: str,
        current: dict[str, Any] | None,
        proposed: dict[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        """The document to write (`proposed` with its owner settled), or a Problem.

        An omitted `spec.owner` keeps the current owner on a replace, and is the caller's
        `org` on a create: a file without an owner never takes a service away from anyone.
        """
        self.require_write()
        if current is not None and not self.admin and not self.sees(current):
            if action in (CREATE, REPLACE):
                raise not_owner(f"the name {name!r} is taken; choose another one")
            raise not_found(name)  # someone else's draft: as if it did not exist
        if current is None and action not in (CREATE, REPLACE):
            raise not_found(name)
        if current is not None and not self.admin and not self.owns(current):
            owner = _owner(current)
            raise not_owner(
                f"service {name!r} is owned by {owner!r}; {self._may_manage()}"
                if owner
                else f"service {name!r} has no owner; only {ADMIN_SCOPE} manages it"
            )
        if proposed is None:
            return None
        owner = _owner(proposed)
        if owner is None:
            owner = _owner(current) if current is not None else self.principal.organization
            if owner is not None:
                proposed = {**proposed, "spec": {**proposed["spec"], "owner": owner}}
        if self.admin:
            return proposed
        if owner is None:
            raise not_owner(
                f"service {name!r}: the token names no organization (no 'org' claim), so "
                f"{WRITE_SCOPE} cannot own anything; set spec.owner with {ADMIN_SCOPE}"
            )
        if owner != self.principal.organization:
            raise not_owner(
                f"service {name!r}: spec.owner {owner!r} is not the token's organization; "
                f"{self._may_manage()}"
            )
        return proposed

    def _may_manage(self) -> str:
        org = self.principal.organization
        if org is None:
            return f"a token without an organization manages nothing without {ADMIN_SCOPE}"
        return f"a {WRITE_SCOPE} token of {org!r} manages only services owned by {org!r}"


FULL = Authority(ADMIN)  # the registry's own housekeeping (the instance reaper)
