"""API keys: the key format, the keys file (load, validate, reload), and ``keys create|revoke``."""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import re
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.auth import AuthFailure
from gateway.auth.api_keys import ApiKeyFile, ApiKeyStore, generate_key, hash_key
from gateway.auth.cli import register
from gateway.config import ApiKeysConfig, AuthConfig, GatewayConfig
from gateway.errors import CliError, ConfigError
from gateway.metrics import Metrics
from gateway.pipeline import RequestContext
from gateway.request import BufferedRequest
from gateway.services import Services
from gateway.stages import authenticate


def _cli(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="maas-gateway")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(list(argv))


def _create(capsys: pytest.CaptureFixture[str], file: Path, *extra: str, subject: str = "svc-a",
            roles: str = "analyst,reader") -> str:
    args = _cli("keys", "create", "--subject", subject, "--roles", roles, "--file", str(file), *extra)
    assert args.func(args) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) == 1  # the key alone on stdout, so a script can capture it
    return lines[0]


def _revoke(file: Path, key_id: str) -> int:
    args = _cli("keys", "revoke", "--id", key_id, "--file", str(file))
    return args.func(args)


def _ctx(headers: dict[str, str]) -> RequestContext:
    return RequestContext(BufferedRequest("GET", "/v1/models", headers=headers), "t", 0.0)


def _stage(path: Path, metrics: Metrics | None = None) -> authenticate.Authenticate:
    config = GatewayConfig(auth=AuthConfig(api_keys=ApiKeysConfig(file=path)))
    return authenticate.build(Services(config=config, metrics=metrics or Metrics(), policy=None))


# --------------------------------------------------------------------------- the key


def test_generated_keys_have_the_prefix_and_256_bits():
    keys = {generate_key() for _ in range(200)}
    assert len(keys) == 200
    for key in keys:
        assert key.startswith("mk_")
        body = key[3:]
        assert re.fullmatch(r"[A-Za-z0-9_-]+", body)
        assert len(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))) >= 32


def test_hash_is_sha256_of_the_key():
    assert hash_key("mk_abc") == "sha256:" + hashlib.sha256(b"mk_abc").hexdigest()


# --------------------------------------------------------------------------- keys create / revoke


def test_create_prints_the_key_once_and_stores_only_its_hash(tmp_path, capsys):
    file = tmp_path / "keys.yaml"
    key = _create(capsys, file, "--id", "k1", "--expires", "2099-01-01T00:00:00Z")
    text = file.read_text()
    assert key not in text and key[3:] not in text
    entries = yaml.safe_load(text)
    assert entries == [{"id": "k1", "hash": hash_key(key), "subject": "svc-a", "roles": ["analyst", "reader"],
                        "attrs": {}, "expires": entries[0]["expires"]}]
    assert entries[0]["expires"].year == 2099
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    identity = ApiKeyStore.load(file).authenticate(key)
    assert (identity.subject, identity.roles, identity.credential_id) == ("svc-a", ("analyst", "reader"), "k1")


def test_create_appends_and_keeps_comments_and_mode(tmp_path, capsys):
    file = tmp_path / "keys.yaml"
    first = _create(capsys, file, "--id", "k1")
    file.write_text("# managed by the platform team\n" + file.read_text())
    os.chmod(file, 0o640)
    second = _create(capsys, file, "--id", "k2", subject="svc-b", roles="writer")
    text = file.read_text()
    assert text.startswith("# managed by the platform team\n")
    assert stat.S_IMODE(file.stat().st_mode) == 0o640
    store = ApiKeyStore.load(file)
    assert store.authenticate(first).subject == "svc-a"
    assert store.authenticate(second).subject == "svc-b"
    assert first != second


def test_create_into_a_flow_style_file_rewrites_it_validly(tmp_path, capsys):
    file = tmp_path / "keys.yaml"
    file.write_text(f'[{{id: old, hash: "{hash_key("mk_" + "x" * 43)}", subject: s, roles: [r]}}]\n')
    key = _create(capsys, file, "--id", "new")
    store = ApiKeyStore.load(file)
    assert sorted(store.ids()) == ["new", "old"]
    assert store.authenticate(key).credential_id == "new"


def test_create_generates_an_id_when_none_is_given(tmp_path, capsys):
    file = tmp_path / "keys.yaml"
    key = _create(capsys, file)
    entry = yaml.safe_load(file.read_text())[0]
    assert entry["id"].startswith("key-")
    assert ApiKeyStore.load(file).authenticate(key).credential_id == entry["id"]


def test_create_refuses_a_duplicate_id_and_leaves_the_file_alone(tmp_path, capsys):
    file = tmp_path / "keys.yaml"
    _create(capsys, file, "--id", "k1")
    before = file.read_bytes()
    with pytest.raises(CliError) as info:
        _create(capsys, file, "--id", "k1")
    assert info.value.code == 1
    assert "k1" in str(info.value)
    assert file.read_bytes() == before


@pytest.mark.parametrize(("argv", "message"), [
    (["--expires", "next tuesday"], "--expires"),
    (["--expires", "2001-01-01T00:00:00Z"], "in the past"),
    (["--id", ""], "--id"),
])
def test_create_refuses_bad_arguments(tmp_path, capsys, argv, message):
    file = tmp_path / "keys.yaml"
    with pytest.raises(CliError, match=re.escape(message)) as info:
        _create(capsys, file, *argv)
    assert info.value.code == 2
    assert not file.exists()


@pytest.mark.parametrize(("subject", "roles"), [(" ", "a"), ("svc", "a\tb"), ("svc\x1b[31m", "a")])
def test_create_refuses_a_bad_subject_or_role(tmp_path, capsys, subject, roles):
    file = tmp_path / "keys.yaml"
    with pytest.raises(CliError):
        _create(capsys, file, subject=subject, roles=roles)
    assert not file.exists()


def test_create_refuses_to_edit_a_malformed_file(tmp_path, capsys):
    file = tmp_path / "keys.yaml"
    file.write_text("- id: k1\n  hash: not-a-hash\n  subject: s\n")
    with pytest.raises(ConfigError) as info:
        _create(capsys, file)
    assert str(info.value).startswith(f"{file}:2: [0].hash:")
    assert file.read_text() == "- id: k1\n  hash: not-a-hash\n  subject: s\n"


def test_create_leaves_no_temporary_files(tmp_path, capsys):
    file = tmp_path / "keys.yaml"
    for i in range(3):
        _create(capsys, file, "--id", f"k{i}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys.yaml"]


def test_revoke_removes_only_that_key_and_keeps_comments(tmp_path, capsys):
    file = tmp_path / "keys.yaml"
    keys = {i: _create(capsys, file, "--id", i) for i in ("a", "b", "c")}
    file.write_text("# header comment\n" + file.read_text())
    assert _revoke(file, "b") == 0
    assert file.read_text().startswith("# header comment\n")
    store = ApiKeyStore.load(file)
    assert sorted(store.ids()) == ["a", "c"]
    with pytest.raises(AuthFailure):
        store.authenticate(keys["b"])
    assert store.authenticate(keys["c"]).credential_id == "c"
    assert _revoke(file, "c") == 0
    assert _revoke(file, "a") == 0
    assert ApiKeyStore.load(file).ids() == []


def test_revoke_in_a_flow_style_file(tmp_path):
    file = tmp_path / "keys.yaml"
    h1, h2 = hash_key("mk_1" + "x" * 43), hash_key("mk_2" + "x" * 43)
    file.write_text(f'[{{id: a, hash: "{h1}", subject: s}}, {{id: b, hash: "{h2}", subject: t}}]\n')
    assert _revoke(file, "a") == 0
    assert ApiKeyStore.load(file).ids() == ["b"]


def test_revoke_unknown_id_is_exit_1(tmp_path, capsys):
    file = tmp_path / "keys.yaml"
    _create(capsys, file, "--id", "k1")
    before = file.read_bytes()
    with pytest.raises(CliError) as info:
        _revoke(file, "nope")
    assert info.value.code == 1
    assert file.read_bytes() == before
    with pytest.raises(CliError):
        _revoke(tmp_path / "missing.yaml", "k1")


def test_keys_command_needs_a_subcommand():
    with pytest.raises(SystemExit):
        _cli("keys")


# --------------------------------------------------------------------------- the file


def _entry(**overrides: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"id": "k1", "hash": hash_key("mk_" + "a" * 43), "subject": "svc", "roles": ["r"]}
    entry.update(overrides)
    return entry


@pytest.mark.parametrize(("text", "where"), [
    ("- id: k1\n  hash: sha256:abc\n  subject: s\n", ":2: [0].hash:"),
    ("- id: k1\n  hash: 'sha256:" + "A" * 64 + "'\n  subject: s\n", ":2: [0].hash:"),
    ("- id: k1\n  hash: mk_plaintextkeyinthefile\n  subject: s\n", ":2: [0].hash:"),
    ("- id: k1\n  subject: s\n", ":1: [0]: missing required key 'hash'"),
    ("- id: k1\n  hash: sha256:" + "a" * 64 + "\n  subject: s\n  role: [x]\n", ":4: [0].role: unknown key"),
    ("- id: k1\n  hash: sha256:" + "a" * 64 + "\n  subject: s\n  roles: admin\n", ":4: [0].roles: expected a list"),
    ("- id: k1\n  hash: sha256:" + "a" * 64 + "\n  subject: s\n  expires: soon\n", ":4: [0].expires:"),
    ("- id: k1\n  hash: sha256:" + "a" * 64 + "\n  subject: s\n  attrs: {sub: root}\n", ":4: [0].attrs.sub:"),
    ("- id: k1\n  hash: sha256:" + "a" * 64 + "\n  subject: s\n- id: k1\n  hash: sha256:" + "b" * 64
     + "\n  subject: t\n", ":4: [1].id: duplicate id"),
    ("- id: k1\n  hash: sha256:" + "a" * 64 + "\n  subject: s\n- id: k2\n  hash: sha256:" + "a" * 64
     + "\n  subject: t\n", ":5: [1].hash: duplicate hash"),
    ("{id: k1}\n", ":1: expected a list"),
    ("- id: k1\n  hash: [unclosed\n", ":3: YAML syntax error"),
])
def test_malformed_keys_file_names_file_line_and_key(tmp_path, text, where):
    file = tmp_path / "keys.yaml"
    file.write_text(text)
    with pytest.raises(ConfigError) as info:
        ApiKeyStore.load(file)
    message = str(info.value)
    assert message.startswith(str(file) + ":")
    assert where in message
    assert "\n" not in message


def test_missing_keys_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        _stage(tmp_path / "nope.yaml")


def test_empty_keys_file_has_no_keys(tmp_path):
    file = tmp_path / "keys.yaml"
    file.write_text("# no keys yet\n")
    assert len(ApiKeyStore.load(file)) == 0


def test_expires_forms(tmp_path):
    file = tmp_path / "keys.yaml"
    file.write_text(yaml.safe_dump([_entry(id="a", expires="2099-01-01T00:00:00+02:00", hash=hash_key("mk_a")),
                                    _entry(id="b", expires="2099-01-01", hash=hash_key("mk_b"))]).replace("'", ""))
    store = ApiKeyStore.load(file)
    assert store.authenticate("mk_a").subject == "svc"
    assert store.authenticate("mk_b").subject == "svc"
    with pytest.raises(AuthFailure, match="expired"):
        store.authenticate("mk_a", now=4_102_444_800.0)  # 2100-01-01


# --------------------------------------------------------------------------- the stage with API keys


async def test_api_key_in_header_and_as_bearer(tmp_path, capsys):
    file = tmp_path / "keys.yaml"
    key = _create(capsys, file, "--id", "k1")
    data = yaml.safe_load(file.read_text())
    data[0]["attrs"] = {"clearance": 3, "team": "fraud"}
    file.write_text(yaml.safe_dump(data))
    stage = _stage(file)
    for headers in ({"X-API-Key": key}, {"Authorization": f"Bearer {key}"}, {"authorization": f"bearer {key}"}):
        ctx = _ctx(headers)
        await stage(ctx)
        identity = ctx.identity
        assert identity is not None
        assert (identity.subject, identity.roles, identity.method, identity.credential_id) == \
            ("svc-a", ("analyst", "reader"), "api_key", "k1")
        assert dict(identity.claims) == {"clearance": 3, "team": "fraud", "sub": "svc-a", "roles": ["analyst", "reader"]}


async def test_reload_picks_up_revocation_and_new_keys(tmp_path, capsys):
    file = tmp_path / "keys.yaml"
    old = _create(capsys, file, "--id", "old")
    metrics = Metrics()
    stage = _stage(file, metrics)
    await stage(_ctx({"X-API-Key": old}))
    new = _create(capsys, file, "--id", "new")
    _revoke(file, "old")
    from gateway.errors import Unauthenticated

    with pytest.raises(Unauthenticated):
        await stage(_ctx({"X-API-Key": new}))  # not before the reload
    await stage.reload()
    with pytest.raises(Unauthenticated):
        await stage(_ctx({"X-API-Key": old}))
    ctx = _ctx({"X-API-Key": new})
    await stage(ctx)
    assert ctx.identity is not None and ctx.identity.credential_id == "new"
    assert metrics.registry.get_sample_value("maas_api_key_reloads_total", {"result": "ok"}) == 1


async def test_reload_of_a_bad_file_keeps_the_old_keys(tmp_path, capsys):
    file = tmp_path / "keys.yaml"
    key = _create(capsys, file, "--id", "k1")
    metrics = Metrics()
    stage = _stage(file, metrics)
    file.write_text("- {id: broken\n")
    await stage.reload()
    assert metrics.registry.get_sample_value("maas_api_key_reloads_total", {"result": "error"}) == 1
    ctx = _ctx({"X-API-Key": key})
    await stage(ctx)
    assert ctx.identity is not None and ctx.identity.subject == "svc-a"


def test_api_key_file_reload_swaps_the_store(tmp_path, capsys):
    file = tmp_path / "keys.yaml"
    _create(capsys, file, "--id", "k1")
    source = ApiKeyFile(file)
    before = source.store
    _create(capsys, file, "--id", "k2")
    source.reload()
    assert source.store is not before and sorted(source.store.ids()) == ["k1", "k2"]
