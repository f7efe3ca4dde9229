"""Config files: every mistake is one line naming file, line and key; env substitution; relative paths."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.errors import ConfigError
from tests.harness import write_config

BASE = """\
server:
  host: 127.0.0.1
  port: 8080
auth:
  jwt:
    issuer: https://idp
    audience: maas
    algorithms: [RS256]
    jwks_file: jwks.json
models:
  chat:
    backend: {type: http, protocol: openai, upstreams: ["http://127.0.0.1:9"]}
"""


def error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, text))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_valid_config_resolves_relative_paths(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, BASE))
    assert config.auth.jwt is not None
    assert config.auth.jwt.jwks_file == tmp_path / "jwks.json"
    assert config.server.port == 8080
    assert config.models["chat"].name == "chat"


def test_unknown_key_names_line_and_suggests(tmp_path: Path) -> None:
    message = error(tmp_path, BASE.replace("  port: 8080", "  prot: 8080"))
    assert message.endswith("gateway.yaml:3: server.prot: unknown key (did you mean 'port'?)")


def test_wrong_type_names_key(tmp_path: Path) -> None:
    message = error(tmp_path, BASE.replace("port: 8080", "port: eighty"))
    assert "gateway.yaml:3: server.port: expected an integer" in message


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    message = error(tmp_path, BASE + "  broken: [unclosed\n")
    assert "gateway.yaml:" in message and "YAML syntax error" in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")


def test_missing_referenced_file(tmp_path: Path) -> None:
    message = error(tmp_path, BASE.replace("jwks_file: jwks.json", "jwks_file: missing.json"))
    assert "auth.jwt.jwks_file: file not found" in message


def test_env_substitution_with_default_and_type(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAAS_TEST_PORT", raising=False)
    config = load_config(write_config(tmp_path, BASE.replace("port: 8080", "port: ${MAAS_TEST_PORT:-8181}")))
    assert config.server.port == 8181
    monkeypatch.setenv("MAAS_TEST_PORT", "9191")
    assert load_config(write_config(tmp_path, BASE.replace("port: 8080", "port: ${MAAS_TEST_PORT}"))).server.port == 9191


def test_unset_env_without_default_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAAS_UNSET_VAR", raising=False)
    message = error(tmp_path, BASE.replace("issuer: https://idp", "issuer: ${MAAS_UNSET_VAR}"))
    assert "environment variable MAAS_UNSET_VAR is not set" in message and "auth.jwt.issuer" in message


def test_alg_none_refused_in_config(tmp_path: Path) -> None:
    message = error(tmp_path, BASE.replace("algorithms: [RS256]", "algorithms: [none]"))
    assert '"none" is never accepted' in message


def test_hs256_without_secret_refused(tmp_path: Path) -> None:
    message = error(tmp_path, BASE.replace("algorithms: [RS256]", "algorithms: [RS256, HS256]"))
    assert "HS256 needs hs256_secret_env" in message


def test_no_auth_is_refused(tmp_path: Path) -> None:
    text = BASE.split("auth:")[0] + "models: {}\n"
    assert "configure at least one of jwt, api_keys, mtls" in error(tmp_path, text)


def test_duplicate_key_refused(tmp_path: Path) -> None:
    message = error(tmp_path, BASE.replace("  port: 8080", "  port: 8080\n  port: 8081"))
    assert "server.port: duplicate key" in message


@pytest.mark.parametrize("text, needle", [
    ("server: [1, 2]\n", "server: expected a mapping"),
    ("- just\n- a list\n", "expected a mapping at the top level"),
    ("", "empty config file"),
])
def test_shape_errors(tmp_path: Path, text: str, needle: str) -> None:
    assert needle in error(tmp_path, text)


def test_cli_prints_one_line_and_exit_2(tmp_path: Path) -> None:
    path = write_config(tmp_path, BASE.replace("port: 8080", "port: [1]"))
    proc = subprocess.run([sys.executable, "-m", "gateway", "serve", "-c", str(path)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "server.port" in lines[0] and "Traceback" not in proc.stderr


def test_quoted_whole_reference_is_typed_but_quoted_text_stays_a_string(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAAS_TEST_PORT", raising=False)
    text = BASE.replace("server:\n  host: 127.0.0.1\n  port: 8080", 'server: {host: 127.0.0.1, port: "${MAAS_TEST_PORT:-8282}"}')
    assert load_config(write_config(tmp_path, text)).server.port == 8282
    message = error(tmp_path, BASE.replace("port: 8080", 'port: "8080"'))
    assert "server.port: expected an integer" in message


def test_shipped_example_config_passes_check() -> None:
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "gateway", "check", "-c", str(root / "deploy/examples/gateway.yaml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    import yaml

    for manifest in ("deploy/docker-compose.yml", "deploy/k8s/sidecar.yaml"):
        assert list(yaml.safe_load_all((root / manifest).read_text()))
