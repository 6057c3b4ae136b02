"""`cityplane operator`: the flags and environment variables the Helm chart relies on."""

from __future__ import annotations

from pathlib import Path

import pytest

from cityplane.cli import build_parser, main
from operators.cli import settings_from


def tokens(tmp_path: Path) -> tuple[Path, Path]:
    registry, identity = tmp_path / "registry-token", tmp_path / "identity-token"
    registry.write_text("r-token\n")
    identity.write_text("i-token\n")
    return registry, identity


def test_flags_become_operator_settings(tmp_path: Path) -> None:
    registry, identity = tokens(tmp_path)
    args = build_parser().parse_args(
        [
            "operator",
            "--registry",
            "http://registry:8090",
            "--registry-token-file",
            str(registry),
            "--identity",
            "http://identity:8080",
            "--identity-token-file",
            str(identity),
            "--namespace",
            "apps",
            "--gateway-namespace",
            "cityplane",
            "--gateway-selector",
            "app.kubernetes.io/component=gateway,tier=edge",
            "--health-port",
            "9000",
            "--peering",
            "cityplane",
        ]
    )
    settings = settings_from(args)
    assert settings.registry.url == "http://registry:8090" and settings.registry.token == "r-token"
    assert settings.identity.token == "i-token"
    assert settings.namespace == "apps" and settings.gateway_namespace == "cityplane"
    assert settings.gateway_selector == {"app.kubernetes.io/component": "gateway", "tier": "edge"}
    assert settings.health_port == 9000 and settings.peering == "cityplane"


def test_environment_fills_in_and_defaults_are_cluster_wide_standalone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry, identity = tokens(tmp_path)
    monkeypatch.setenv("CITYPLANE_REGISTRY_URL", "http://r")
    monkeypatch.setenv("CITYPLANE_REGISTRY_TOKEN_FILE", str(registry))
    monkeypatch.setenv("CITYPLANE_IDENTITY_URL", "http://i")
    monkeypatch.setenv("CITYPLANE_IDENTITY_TOKEN_FILE", str(identity))
    settings = settings_from(build_parser().parse_args(["operator", "--standalone"]))
    assert (settings.registry.url, settings.identity.url) == ("http://r", "http://i")
    assert settings.namespace is None and settings.peering is None
    assert settings.health_port == 8082
    assert settings.gateway_selector == {"app.kubernetes.io/component": "gateway"}


def test_missing_settings_are_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["operator", "--registry", "http://r"]) == 2
    err = capsys.readouterr().err
    assert "--registry-token-file" in err and "--identity" in err


def test_peering_and_standalone_exclude_each_other() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["operator", "--peering", "x", "--standalone"])
