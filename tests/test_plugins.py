"""The plugin boundary: config is pure data, backends are found by entry point and resolved once above it."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway import backend as backend_mod
from gateway.backend import Backend, BackendEnv, backend_class, registered
from gateway.config import ServerConfig, load_config
from gateway.errors import ConfigError
from gateway.plugins import backends_for, plug
from tests.harness import write_config  # a config file beside an empty JWKS (the config tests use it too)

ASSETS = Path(__file__).resolve().parents[1] / "backends" / "torch" / "assets"
BASE = """\
auth:
  jwt:
    jwks_file: jwks.json
models:
  chat:
    backend: {type: http, protocol: openai, upstreams: ["http://127.0.0.1:9"]}
"""


def test_unknown_backend_type(tmp_path: Path) -> None:
    """Moved from test_config: the lookup now happens in the plugin step, with the same file:line error."""
    config = load_config(write_config(tmp_path, BASE.replace("type: http", "type: grpc")))  # pure data: loads
    with pytest.raises(ConfigError) as info:
        plug(config)
    message = str(info.value)
    assert "\n" not in message
    assert message.endswith("gateway.yaml:6: models.chat.backend.type: unknown backend type 'grpc'")


def test_a_backend_section_mistake_names_file_and_line(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, BASE.replace("upstreams:", "upstreamz:")))
    with pytest.raises(ConfigError, match=r"gateway\.yaml:6: models\.chat\.backend\.upstreamz: unknown key"):
        plug(config)


def test_the_built_in_backends_are_found_by_entry_point() -> None:
    from backends.http import HttpBackend
    from backends.torch import TorchBackend

    assert backend_class("http") is HttpBackend and backend_class("torch") is TorchBackend
    assert {"http", "torch"} <= set(registered())
    for kind in ("grpc", None, 3):
        with pytest.raises(KeyError):
            backend_class(kind)


def test_each_model_is_resolved_once_and_typed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from backends.http import HttpBackend, HttpBackendConfig

    calls: list[object] = []
    real = backend_mod.backend_class

    def counting(kind: object) -> type[Backend]:
        calls.append(kind)
        return real(kind)

    monkeypatch.setattr("gateway.plugins.backend_class", counting)
    config = load_config(write_config(tmp_path, BASE))
    plugged = plug(config)
    assert calls == ["http"]
    chat = plugged["chat"]
    assert chat.name == "chat" and chat.backend_class is HttpBackend
    assert isinstance(chat.backend_config, HttpBackendConfig) and chat.backend_config.protocol == "openai"
    made = chat.create(BackendEnv(ServerConfig()))
    assert isinstance(made, HttpBackend) and made.protocol() == "openai"


def test_the_gateway_uses_the_plugged_models_it_is_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.app import Gateway

    (tmp_path / "keys.yaml").write_text("[]\n")
    config = load_config(write_config(tmp_path, BASE.replace("jwt:\n    jwks_file: jwks.json", "api_keys: {file: keys.yaml}")))
    plugged = plug(config)
    monkeypatch.setattr("gateway.app.plug", lambda _: pytest.fail("resolved a second time"))
    gateway = Gateway(config, plugged)
    assert gateway.plugged is plugged and gateway.backends["chat"].protocol() == "openai"


def test_the_interface_hooks_have_harmless_defaults() -> None:
    class Echo(Backend):
        config_class = dict

        async def handle(self, ctx: Any) -> Any:
            raise NotImplementedError

    class WithPath:
        path = "/models/m.bin"

    echo = Echo("e", None, {}, BackendEnv(ServerConfig()))  # type: ignore[arg-type]
    assert echo.protocol() == "v2" and echo.declared_inputs() is None and echo.raw_paths() == []
    assert Echo.config_findings("e", {}) == []
    assert Echo.data_path(object()) is None and Echo.data_path(WithPath()) == Path("/models/m.bin")
    sub = argparse.ArgumentParser().add_subparsers()
    Echo.add_commands(sub)
    assert sub.choices == {}


def test_the_torch_backend_reports_its_own_findings(tmp_path: Path) -> None:
    from backends.torch import TorchBackend, TorchBackendConfig

    unsigned = tmp_path / "m.safetensors"
    cfg = TorchBackendConfig(type="torch", path=unsigned)
    messages = [(f.severity, f.message) for f in TorchBackend.config_findings("m", cfg)]
    assert messages == [("medium", "model signature not verified (no verify_key_file)"),
                        ("low", "model weights are not encrypted at rest")]
    assert TorchBackend.data_path(cfg) == unsigned


def test_the_old_import_path_still_serves_third_party_backends() -> None:
    from backends import base

    assert base.Backend is Backend and base.BackendEnv is BackendEnv and base.backend_class is backend_class


def test_check_reports_a_backend_mistake_with_file_and_line(tmp_path: Path) -> None:
    path = write_config(tmp_path, BASE.replace("type: http", "type: grpc"))
    proc = subprocess.run([sys.executable, "-m", "gateway", "check", "-c", str(path)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().endswith("gateway.yaml:6: models.chat.backend.type: unknown backend type 'grpc'")


def test_serve_refuses_a_backend_mistake_before_listening(tmp_path: Path) -> None:
    path = write_config(tmp_path, BASE.replace("type: http", "type: grpc"))
    proc = subprocess.run([sys.executable, "-m", "gateway", "serve", "-c", str(path), "--workers", "2"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "models.chat.backend.type: unknown backend type 'grpc'" in lines[0]


def test_backend_commands_come_from_the_backends() -> None:
    from gateway.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"model", "demo"} <= set(sub.choices)


def test_openapi_asks_the_backends_what_they_serve(tmp_path: Path) -> None:
    from gateway.openapi import build_document

    text = BASE + f"""\
  d:
    backend: {{type: torch, path: {ASSETS / "digits.safetensors"}}}
  legacy:
    backend: {{type: http, protocol: raw, upstreams: ["http://127.0.0.1:9"], paths: [/predict]}}
"""
    config = load_config(write_config(tmp_path, text))
    made = backends_for(config)
    assert {n: b.protocol() for n, b in made.items()} == {"chat": "openai", "d": "v2", "legacy": "raw"}
    paths = build_document(config, made)["paths"]
    assert {"/v1/chat/completions", "/v2/models/d/infer", "/predict"} <= set(paths)


def test_a_config_built_in_code_still_names_the_key() -> None:
    from gateway.config import GatewayConfig, ModelConfig
    from gateway.typedyaml import Section, Source

    model = ModelConfig(backend=Section({"type": "grpc"}, "models.m.backend", Source("x.yaml")), name="m")
    with pytest.raises(ConfigError, match=r"^models\.m\.backend\.type: unknown backend type 'grpc'$"):
        plug(GatewayConfig(models={"m": model}))
