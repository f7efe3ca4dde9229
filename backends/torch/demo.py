"""Everything ``maas-gateway demo`` needs, generated into a fresh directory.

The demo is the production path in miniature, not a shortcut around it: the
bundled digits model's shipped signature is checked first; the model is then
encrypted with a freshly generated AES key and signed with a freshly generated
Ed25519 key, exactly as an operator would protect their own model; a fresh RSA
key pair signs the demo bearer token and its JWKS is what the gateway trusts.
Quotas live in memory (no Redis) and output hardening is on, so the answer
shows the ``top_k_indices``/``top_k_scores`` a hardened caller gets.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shlex
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from gateway.errors import ConfigError

from . import artifact, signing

ASSETS = Path(__file__).resolve().parent / "assets"
BUNDLED_MODEL = ASSETS / "digits.safetensors"
BUNDLED_PUBLIC_KEY = ASSETS / "digits_signing.pub"
ISSUER = "https://demo.maas-gateway.local"
AUDIENCE = "maas"
TOKEN_TTL_S = 12 * 3600
# a held-out scikit-learn digit (a handwritten 3), 8x8 pixels with values 0..16
SAMPLE_DIGIT = [0, 0, 6, 14, 16, 16, 2, 0, 0, 5, 16, 13, 11, 16, 0, 0, 0, 0, 7, 2, 15, 12, 0, 0, 0, 0, 0, 7, 16, 13,
                1, 0, 0, 0, 0, 0, 6, 15, 10, 0, 0, 0, 0, 0, 0, 15, 9, 0, 0, 0, 3, 11, 8, 16, 6, 0, 0, 0, 7, 16, 16, 8,
                0, 0]
SAMPLE_LABEL = 3


class DemoSetup(NamedTuple):
    config_path: Path
    token: str
    curl: str


def sample_request(pixels: list[int] | None = None) -> dict[str, Any]:
    data = pixels if pixels is not None else SAMPLE_DIGIT
    return {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": data}]}


def prepare_demo(port: int = 8080, admin_port: int = 9090, directory: Path | None = None) -> DemoSetup:
    """Write a complete demo setup and return (config path, bearer token, curl line).

    Without ``directory`` a private temporary directory is created and removed
    when the process exits.
    """
    if directory is None:
        directory = Path(tempfile.mkdtemp(prefix="maas-demo-"))
        atexit.register(shutil.rmtree, directory, True)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)

    # 1. the shipped model must be the one its publisher signed
    try:
        signing.verify_file(BUNDLED_MODEL, signing.load_public_key(BUNDLED_PUBLIC_KEY))
    except signing.SignatureError as exc:
        raise ConfigError(f"bundled digits model failed its signature check: {exc}") from None

    # 2. protect it as an operator would: encrypt with a new key, sign the encrypted artifact
    key = artifact.new_key()
    key_file = directory / "model.key"
    _write_private(key_file, (artifact.encode_key(key) + "\n").encode())
    encrypted = directory / "digits.safetensors.enc"
    with open(BUNDLED_MODEL, "rb") as src, open(encrypted, "wb") as dst:
        artifact.encrypt_stream(src, dst, key, chunk_size=4096)  # small chunks: the demo shows several
    signer = signing.new_signing_key()
    signing.sign_file(encrypted, signer)
    (directory / "model_signing.pub").write_bytes(signing.public_pem(signer.public_key()))

    # 3. identity: an RSA key pair whose JWKS the gateway trusts, and a token for the demo user
    token = _write_jwks_and_token(directory)

    policy = {
        "roles": {"demo": []},
        "rules": [{"id": "demo-uses-digits", "roles": ["demo"], "models": ["digits"], "actions": ["infer", "read"],
                   "effect": "allow"}],
        "quotas": [{"id": "demo-rate", "roles": ["demo"], "models": ["digits"], "rate_per_s": 20, "burst": 40}],
        "outputs": [{"id": "demo-top3", "roles": ["demo"], "models": ["digits"], "top_k": 3, "round_decimals": 3}],
    }
    config = {
        "server": {"host": "127.0.0.1", "port": port},
        "admin": {"host": "127.0.0.1", "port": admin_port},
        "auth": {"jwt": {"issuer": ISSUER, "audience": AUDIENCE, "algorithms": ["RS256"], "jwks_file": "jwks.json"}},
        "policy": {"file": "policy.yaml"},
        "quota": {"store": "memory"},
        "audit": {"file": "audit.log"},
        "models": {
            "digits": {
                "labels": {"sensitivity": "public"},
                "requires": {"min_free_ram_mb": 64, "min_free_disk_mb": 1},
                "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
                "backend": {
                    "type": "torch",
                    "path": encrypted.name,
                    "arch": "digits-mlp",
                    "key_file": key_file.name,
                    "verify_key_file": "model_signing.pub",
                    "max_batch_size": 64,
                    "max_batch_delay_ms": 2,
                },
            }
        },
    }
    (directory / "policy.yaml").write_text(yaml.safe_dump(policy, sort_keys=False))
    config_path = directory / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    body = json.dumps(sample_request(), separators=(",", ":"))
    curl = (f"curl -s http://127.0.0.1:{port}/v2/models/digits/infer -H {shlex.quote('Authorization: Bearer ' + token)}"
            f" -H 'Content-Type: application/json' -d {shlex.quote(body)}")
    return DemoSetup(config_path, token, curl)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_jwks_and_token(directory: Path) -> str:
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    kid = "demo-" + os.urandom(4).hex()
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
    jwk.update({"kid": kid, "use": "sig", "alg": "RS256"})
    (directory / "jwks.json").write_text(json.dumps({"keys": [jwk]}, indent=2))
    _write_private(directory / "demo_token_key.pem", private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "demo-user", "roles": ["demo"], "iat": now, "nbf": now,
              "exp": now + TOKEN_TTL_S}
    return jwt.encode(claims, private, algorithm="RS256", headers={"kid": kid})


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``maas-gateway demo``: offered by the torch backend, since the demo is its bundled model."""
    p = subparsers.add_parser("demo", help="self-contained demo: bundled digits model, memory quotas, demo keys")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--admin-port", type=int, default=9090)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    """Write the demo into a fresh directory and serve it in this process until Ctrl-C."""
    from gateway.launch import serve

    setup = prepare_demo(port=args.port, admin_port=args.admin_port)
    print("maas-gateway demo: the digits model behind the full pipeline (in-memory quotas, demo keys)")
    print(f"  config:  {setup.config_path}")
    print(f"  token:   {setup.token}")
    print(f"  try:     {setup.curl}")
    print("  stop:    Ctrl-C", flush=True)
    return serve(str(setup.config_path), workers=1)
