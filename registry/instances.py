"""Instances that register themselves (`spec.upstream.instances`): the request body and id."""

from __future__ import annotations

from pydantic import Field

from cityplane.schema import Target

INSTANCE_ID_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"
INSTANCE_ACTIONS = ("register", "heartbeat", "deregister", "expire", "remove")


class InstanceRegistration(Target):
    """The body of `PUT /v1/services/{name}/instances/{id}`: the instance's URL and weight."""

    url: str = Field(description="Base URL of this instance, http:// or https://.")
