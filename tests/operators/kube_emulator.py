"""kmock 0.8's Kubernetes emulator, with the API-server behaviour kopf relies on added.

kmock 0.8 (pinned: this relies on its internals) sets no ``uid``, ``resourceVersion``,
``generation`` or ``creationTimestamp``, answers a failed JSON-patch ``test`` with 500 (kopf's
finalizer patches test ``resourceVersion`` and expect 422), lists with a placeholder
``resourceVersion`` and ignores it on watches (every watch replays everything as ADDED and
misses what changed between the list and the watch) and fails on ``/api/v1/namespaces``.
This subclass keeps one change log with
real resource versions and serves lists, watches and writes from it:

- create: ``uid``, ``creationTimestamp``, ``generation: 1``, ``resourceVersion``;
  ``generateName`` (kopf's events) gets a suffix; 409 when the name is taken;
- patch: JSON patch (``test`` failures are 422) or a merge patch, whatever the content type;
  the main endpoint ignores ``status`` and the ``/status`` subresource changes only ``status``
  (as for every resource with a status subresource); ``generation`` grows when ``spec`` changes;
- delete: with finalizers only ``deletionTimestamp``; gone once the finalizers are removed;
- watch ``?resourceVersion=N`` replays the changes after N, then streams new ones;
- ``/api/v1/namespaces`` lists the namespaces in use (for an operator given namespaces).

Still not emulated (kept to render tests and schema validation): garbage collection by owner
references, server-side apply, strategic merge, defaulting, admission and schema validation.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import uuid
import warnings
from collections.abc import AsyncIterator
from typing import Any

import attrs
import jsonpatch
import kmock
from aiohttp import web
from kmock._internal import dicts, enums, rendering

CITYAPPS = "cityplane.io/v1alpha1/cityapps"


@attrs.define(kw_only=True)
class KubeEmulator(kmock.KubernetesEmulator):
    _revision: int = attrs.field(default=0, init=False)
    _changes: list[tuple[int, Any, dict[str, Any]]] = attrs.field(factory=list, init=False)
    _changed: asyncio.Condition = attrs.field(factory=asyncio.Condition, init=False)

    # kmock 0.8 cannot parse `/api/v1/namespaces` (500), which kopf lists and watches when it
    # serves given namespaces: served here from these names plus every object's namespace.
    namespaces: set[str] = attrs.field(factory=set)

    async def __call__(self, raw_request: web.BaseRequest) -> web.StreamResponse:
        if raw_request.path.rstrip("/") != "/api/v1/namespaces":
            response: web.StreamResponse = await super().__call__(raw_request)
            return response
        if raw_request.query.get("watch") == "true":
            stream = web.StreamResponse()
            await stream.prepare(raw_request)
            # Namespaces do not come and go in these tests: an idle stream until it times out.
            await asyncio.sleep(float(raw_request.query.get("timeoutSeconds") or 300))
            return stream
        names = self.namespaces | {ns for (_, ns, _) in self.objects if ns}
        items = [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
            for name in sorted(names)
        ]
        return web.json_response(
            {
                "kind": "NamespaceList",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self._revision)},
                "items": items,
            }
        )

    @classmethod
    def with_cityplane(cls) -> KubeEmulator:
        emulator = cls()
        # kopf waits forever for namespaces/CRDs in discovery without the built-in list.
        with warnings.catch_warnings():  # kmock 0.8 reads it with a deprecated importlib call
            warnings.simplefilter("ignore", DeprecationWarning)
            emulator.resources.load_bundled()
        emulator.resources[CITYAPPS] = kmock.ResourceInfo(
            kind="CityApp",
            singular="cityapp",
            namespaced=True,
            verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
            subresources={"status"},
        )
        return emulator

    # --- state changes ----------------------------------------------------------------------

    def _next_version(self) -> str:
        self._revision += 1
        return str(self._revision)

    async def _record(self, resource: Any, type_: str, raw: dict[str, Any]) -> None:
        self._changes.append((self._revision, resource, {"type": type_, "object": raw}))
        async with self._changed:
            self._changed.notify_all()

    async def _handle(self, request: rendering.Request) -> Any:
        release: Any = None
        if request.resource is not None:
            async with self._lock:
                if request.action == enums.action.CREATE:
                    await self._create(request)
                elif request.action == enums.action.DELETE and request.name is not None:
                    release = await self._delete(request)
                elif request.action == enums.action.UPDATE and request.name is not None:
                    release = await self._update(request)
        try:
            # The plain handler: reactions and the emulator's read-only fallbacks; the state
            # changes of kmock.KubernetesEmulator._handle are replaced by the ones above.
            return await kmock.RawHandler._handle(self, request)
        finally:
            if release is not None:
                async with self._lock:
                    raw = self.objects[release].raw
                    self.objects[release].delete()
                    raw = {
                        **raw,
                        "metadata": {**raw["metadata"], "resourceVersion": self._next_version()},
                    }
                    await self._record(release[0], "DELETED", raw)

    async def _create(self, request: rendering.Request) -> None:
        data = request.data
        meta = data.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        namespace = request.namespace or meta.get("namespace")
        if namespace:
            meta["namespace"] = namespace
        key = (request.resource, namespace, meta.get("name"))
        if key in self.objects and not self.objects[key].deleted:
            raise kmock.KubernetesError(409, "AlreadyExists", f"{meta.get('name')} already exists")
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        meta.update(
            uid=str(uuid.uuid4()),
            creationTimestamp=now,
            generation=1,
            resourceVersion=self._next_version(),
        )
        meta.pop("deletionTimestamp", None)
        if key in self.objects:
            self.objects[key].create(data)
        else:
            self.objects[key] = data
        await self._record(request.resource, "ADDED", self.objects[key].raw)

    async def _delete(self, request: rendering.Request) -> Any:
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            raise kmock.KubernetesObjectNotFoundError()
        meta = self.objects[key].get("metadata", {})
        if meta.get("deletionTimestamp"):
            return None
        if meta.get("finalizers"):
            now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            self.objects[key].patch(
                {"metadata": {"deletionTimestamp": now, "resourceVersion": self._next_version()}}
            )
            await self._record(request.resource, "MODIFIED", self.objects[key].raw)
            return None
        return key  # released after the response is rendered (it shows the last state)

    async def _update(self, request: rendering.Request) -> Any:
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            raise kmock.KubernetesObjectNotFoundError()
        old = copy.deepcopy(self.objects[key].raw)
        try:
            new = dict(dicts.patch_dict(old, request.data))
        except jsonpatch.JsonPatchTestFailed as exc:
            raise kmock.KubernetesError(422, "Invalid", f"the patch test failed: {exc}") from None
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
            raise kmock.KubernetesError(422, "Invalid", str(exc)) from None
        if request.subresource == "status":
            new = {**old, "status": new.get("status")}
        elif request.subresource is None:
            new = {**new, "status": old.get("status")}
        if new.get("status") is None:
            new.pop("status", None)
        meta = new.setdefault("metadata", {})
        # Identity fields are the server's, whatever the patch said.
        for field in ("uid", "creationTimestamp", "deletionTimestamp"):
            if field in old.get("metadata", {}):
                meta[field] = old["metadata"][field]
        meta["generation"] = old["metadata"].get("generation", 1) + (
            1 if new.get("spec") != old.get("spec") else 0
        )
        meta["resourceVersion"] = self._next_version()
        self.objects[key].history.append(new)
        await self._record(request.resource, "MODIFIED", self.objects[key].raw)
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            return key
        return None

    # --- reads --------------------------------------------------------------------------------

    def _matches(self, request: rendering.Request, resource: Any, raw: dict[str, Any]) -> bool:
        meta = raw.get("metadata", {})
        check = self._KubernetesEmulator__check  # type: ignore[attr-defined]
        return bool(check(request, resource, meta.get("namespace"), meta.get("name"), strict=False))

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        if request.resource not in self._get_resources():
            raise kmock.KubernetesResourceNotFoundError()
        async with self._lock:
            items = [
                obj.raw
                for (resource, _, _), obj in self.objects.items()
                if not obj.deleted and self._matches(request, resource, obj.raw)
            ]
            version = str(self._revision)
        return {"metadata": {"resourceVersion": version}, "items": items}

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[rendering.Payload]:
        yield b""  # send the headers at once: the client waits for them
        since = request.params.get("resourceVersion") or ""
        async with self._lock:
            if since.isdigit() and int(since) > 0:
                pending = [
                    event
                    for version, resource, event in self._changes
                    if version > int(since) and self._matches(request, resource, event["object"])
                ]
            else:
                pending = [
                    {"type": "ADDED", "object": obj.raw}
                    for (resource, _, _), obj in self.objects.items()
                    if not obj.deleted and self._matches(request, resource, obj.raw)
                ]
            position = len(self._changes)
        for event in pending:
            yield event
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda p=position: len(self._changes) > p)
            batch, position = self._changes[position:], len(self._changes)
            for _, resource, event in batch:
                if self._matches(request, resource, event["object"]):
                    yield event

    # --- for tests ------------------------------------------------------------------------------

    def stored(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The object as stored, e.g. ``get('apps/v1/deployments', 'ns', 'web')``."""
        for (resource, ns, nm), obj in self.objects.items():
            if ns == namespace and nm == name and resource == kmock.resource(plural):
                return None if obj.deleted else copy.deepcopy(obj.raw)
        return None
