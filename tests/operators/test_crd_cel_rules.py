"""The CityApp CRD's CEL rules (`x-kubernetes-validations`), evaluated by a CEL engine.

No API server runs here, so the rules the CRD hands to Kubernetes would otherwise only be
checked for being present. cel-python (celpy, a CEL implementation) compiles and evaluates each
one where the API server would: on the node at its path, for every array item, only when that
node is set. Each rule must compile, and on every case below the rules must refuse exactly
what the operator's own model (`AppSpec`) refuses, with the rule's message.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml
from pydantic import ValidationError

from cityplane.schema import AppSpec
from operators import crd_schema as crds

ROOT = Path(__file__).resolve().parents[2]
APP_EXAMPLE = ROOT / "examples" / "k8s" / "cityapp-bus-tracker.yaml"

Rule = tuple[tuple[str, ...], str, str]  # path (property names, "[]" for items), rule, message


def _rules(node: dict[str, Any], path: tuple[str, ...] = ()) -> Iterator[Rule]:
    for rule in node.get("x-kubernetes-validations", []):
        yield path, rule["rule"], rule["message"]
    for name, child in node.get("properties", {}).items():
        yield from _rules(child, (*path, name))
    if "items" in node:
        yield from _rules(node["items"], (*path, "[]"))


def _spec_rules() -> list[Rule]:
    (version,) = crds.cityapp_crd()["spec"]["versions"]
    return list(_rules(version["schema"]["openAPIV3Schema"]["properties"]["spec"]))


def _nodes_at(value: Any, path: tuple[str, ...]) -> Iterator[Any]:
    """The values a rule at ``path`` is evaluated on: none where a part is unset."""
    if not path:
        yield value
        return
    head, rest = path[0], path[1:]
    if head == "[]":
        for item in value if isinstance(value, list) else []:
            yield from _nodes_at(item, rest)
    elif isinstance(value, dict) and value.get(head) is not None:  # a null is pruned
        yield from _nodes_at(value[head], rest)


_ENV = celpy.Environment()
_PROGRAMS: dict[str, Any] = {}


def _program(rule: str) -> Any:
    if rule not in _PROGRAMS:
        _PROGRAMS[rule] = _ENV.program(_ENV.compile(rule))
    return _PROGRAMS[rule]


def cel_refusals(spec: dict[str, Any]) -> list[str]:
    """The messages of the rules that refuse ``spec``, as the API server would list them."""
    refused = []
    for path, rule, message in _spec_rules():
        for node in _nodes_at(spec, path):
            verdict = _program(rule).evaluate({"self": celpy.json_to_cel(node)})
            assert isinstance(verdict, celpy.celtypes.BoolType), (rule, verdict)
            if not verdict:
                refused.append(message)
    return refused


def model_accepts(spec: dict[str, Any]) -> bool:
    try:
        AppSpec.model_validate(spec)
    except ValidationError:
        return False
    return True


def _example() -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load(APP_EXAMPLE.read_text(encoding="utf-8"))["spec"]
    return spec


def _with(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    spec = copy.deepcopy(_example())
    change(spec)
    return spec


def _set(*path: str | int, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(spec: dict[str, Any]) -> None:
        node: Any = spec
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value

    return change


def _drop(*path: str | int) -> Callable[[dict[str, Any]], None]:
    def change(spec: dict[str, Any]) -> None:
        node: Any = spec
        for part in path[:-1]:
            node = node[part]
        del node[path[-1]]

    return change


def test_every_rule_of_the_crd_compiles_as_cel() -> None:
    rules = _spec_rules()
    assert len(rules) == sum(len(r) for r in crds.CITYAPP_RULES.values()) == 4
    for _path, rule, _message in rules:
        _program(rule)  # raises CELParseError on a syntax error


CASES: dict[str, tuple[Callable[[dict[str, Any]], None], list[str]]] = {
    "the example": (lambda spec: None, []),
    "replicas and autoscaling": (
        _set("replicas", value=3),
        ["give either replicas or autoscaling, not both"],
    ),
    "replicas alone": (
        lambda spec: (spec.pop("autoscaling"), spec.update(replicas=3)),
        [],
    ),
    "neither replicas nor autoscaling": (_drop("autoscaling"), []),
    "minReplicas above maxReplicas": (
        _set("autoscaling", "minReplicas", value=11),
        ["minReplicas must not be greater than maxReplicas"],
    ),
    "minReplicas equal to maxReplicas": (_set("autoscaling", "minReplicas", value=10), []),
    "no minReplicas": (_drop("autoscaling", "minReplicas"), []),
    "a match with path and pathPrefix": (
        _set("routes", 1, "match", "pathPrefix", value="/tracker/"),
        ["give exactly one of 'pathPrefix' or 'path'"],
    ),
    "a match with neither path nor pathPrefix": (
        _drop("routes", 0, "match", "pathPrefix"),
        ["give exactly one of 'pathPrefix' or 'path'"],
    ),
    "a public client with client_credentials": (
        lambda spec: spec["identity"].update(
            publicClient=True, grantTypes=["authorization_code", "client_credentials"]
        ),
        ["a public client cannot use the client_credentials grant"],
    ),
    "a public client without client_credentials": (
        _set("identity", "publicClient", value=True),
        [],
    ),
    "a confidential client with client_credentials": (
        _set("identity", "grantTypes", value=["client_credentials"]),
        [],
    ),
    "two rules broken at once": (
        lambda spec: (spec.update(replicas=2), spec["autoscaling"].update(minReplicas=20)),
        [
            "give either replicas or autoscaling, not both",
            "minReplicas must not be greater than maxReplicas",
        ],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_rules_refuse_what_the_operators_model_refuses(case: str) -> None:
    change, expected = CASES[case]
    spec = _with(change)
    refused = cel_refusals(spec)
    assert sorted(refused) == sorted(expected)
    assert model_accepts(spec) == (not refused)
