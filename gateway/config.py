"""The gateway's configuration file as frozen, typed objects.

Everything a request needs is resolved here, once, at start-up: relative paths
become absolute (relative to the file that names them) and ``${ENV}`` is
substituted. This module is pure data: a model's ``backend:`` section stays an
untyped ``Section`` here, and the plugin step above it (``gateway.plugins``)
finds the backend class and types the section, with the same file:line errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError
from .typedyaml import Section, Source, build, load

NEVER_ALGORITHMS = frozenset({"none", "None", "NONE", "nOnE"})
SUPPORTED_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA", "HS256", "HS384", "HS512")


@dataclass(frozen=True, slots=True)
class TlsConfig:
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None  # set => mTLS required

    def validate(self) -> tuple[str, str] | None:
        for key in ("cert_file", "key_file", "client_ca_file"):
            p = getattr(self, key)
            if p is not None and not p.is_file():
                return key, f"file not found: {p}"
        return None


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 1_048_576  # 1 MiB
    upstream_timeout_s: float = 30.0
    upstream_connect_timeout_s: float = 5.0
    shutdown_timeout_s: float = 30.0  # graceful drain on SIGTERM
    body_timeout_s: float = 30.0  # a body that stops arriving is refused (408) after this long
    # client-side limits, enforced per connection by gateway.connection_limits
    header_timeout_s: float = 10.0  # a request line + headers must arrive whole within this, else the connection closes
    keepalive_timeout_s: float = 75.0  # an idle client connection is closed after this
    max_header_bytes: int = 65_536  # request line + all headers; beyond it: 431, connection closed
    max_connections: int = 10_000  # open client connections per process; beyond it a new one is closed at once
    max_connections_per_ip: int = 1024  # the same, per client address
    client_write_timeout_s: float = 30.0  # a client that takes nothing of an answer (or stream) this long is dropped
    workers: int = 1
    tls: TlsConfig | None = None

    def validate(self) -> tuple[str, str] | None:
        if not 0 <= self.port <= 65535:
            return "port", "must be between 0 and 65535"
        if self.max_body_bytes < 1:
            return "max_body_bytes", "must be positive"
        if self.upstream_timeout_s <= 0:
            return "upstream_timeout_s", "must be positive"
        for key in ("header_timeout_s", "keepalive_timeout_s", "client_write_timeout_s"):
            if getattr(self, key) <= 0:
                return key, "must be positive"
        if self.max_header_bytes < 1024:
            return "max_header_bytes", "must be at least 1024"
        if self.max_connections < 1:
            return "max_connections", "must be at least 1"
        if self.max_connections_per_ip < 1:
            return "max_connections_per_ip", "must be at least 1"
        if self.workers < 1:
            return "workers", "must be at least 1"
        return None


@dataclass(frozen=True, slots=True)
class AdminConfig:
    host: str = "127.0.0.1"
    port: int = 9090


@dataclass(frozen=True, slots=True)
class JwtConfig:
    issuer: str | None = None
    audience: str | list[str] | None = None
    algorithms: list[str] = field(default_factory=lambda: ["RS256", "ES256"])
    jwks_file: Path | None = None
    jwks_url: str | None = None
    public_key_file: Path | None = None
    hs256_secret_env: str | None = None
    leeway_s: float = 30.0
    roles_claim: str = "roles"
    subject_claim: str = "sub"
    max_token_bytes: int = 8192
    cache_size: int = 10_000  # verified tokens kept (keyed by SHA-256 of the token)
    jwks_cache_s: float = 300.0  # jwks_url: refetch after this long
    jwks_min_refresh_s: float = 30.0  # jwks_url: at most one refresh per interval on an unknown kid

    def validate(self) -> tuple[str, str] | None:
        sources = [s for s in ("jwks_file", "jwks_url", "public_key_file", "hs256_secret_env") if getattr(self, s)]
        if not sources:
            return "", "needs one key source: jwks_file, jwks_url, public_key_file or hs256_secret_env"
        if len(sources) > 1:
            return "", f"give only one key source, got {', '.join(sources)}"
        if not self.algorithms:
            return "algorithms", "must list at least one algorithm"
        for alg in self.algorithms:
            if alg.lower() == "none":
                return "algorithms", '"none" is never accepted'
            if alg not in SUPPORTED_ALGORITHMS:
                return "algorithms", f"unsupported algorithm {alg!r}"
        hmac = [a for a in self.algorithms if a.startswith("HS")]
        if hmac and not self.hs256_secret_env:
            return "algorithms", f"{hmac[0]} needs hs256_secret_env (and only a secret)"
        if self.hs256_secret_env and len(hmac) != len(self.algorithms):
            return "algorithms", "with hs256_secret_env only HS256/HS384/HS512 may be listed"
        if self.jwks_file and not self.jwks_file.is_file():
            return "jwks_file", f"file not found: {self.jwks_file}"
        if self.public_key_file and not self.public_key_file.is_file():
            return "public_key_file", f"file not found: {self.public_key_file}"
        if self.jwks_url and not self.jwks_url.startswith(("https://", "http://")):
            return "jwks_url", "must be an http(s) URL"
        return None


@dataclass(frozen=True, slots=True)
class ApiKeysConfig:
    file: Path


@dataclass(frozen=True, slots=True)
class MtlsAuthConfig:
    """Accept a verified client certificate as the identity (needs server.tls.client_ca_file)."""

    roles: list[str] = field(default_factory=list)  # roles granted to every certificate subject


@dataclass(frozen=True, slots=True)
class AuthConfig:
    jwt: JwtConfig | None = None
    api_keys: ApiKeysConfig | None = None
    mtls: MtlsAuthConfig | None = None


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    file: Path
    model_file: Path | None = None
    watch: bool = True
    watch_interval_s: float = 1.0
    decision_cache_size: int = 10_000

    def validate(self) -> tuple[str, str] | None:
        if not self.file.is_file():
            return "file", f"file not found: {self.file}"
        if self.model_file is not None and not self.model_file.is_file():
            return "model_file", f"file not found: {self.model_file}"
        return None


@dataclass(frozen=True, slots=True)
class QuotaConfig:
    store: str = "memory"  # "memory" or a redis://, rediss://, redis+sentinel:// or cluster URL
    on_store_error: Literal["deny", "allow"] = "deny"
    timeout_ms: int = 100
    password_env: str | None = None
    key_prefix: str = "maas:"
    cluster: bool = False
    default_tokens_per_request: int = 256  # LLM token budget: estimate when max_tokens is absent

    def validate(self) -> tuple[str, str] | None:
        if self.store != "memory" and not self.store.startswith(("redis://", "rediss://", "unix://", "redis+sentinel://")):
            return "store", 'must be "memory" or a redis:// / rediss:// / redis+sentinel:// URL'
        if self.timeout_ms < 1:
            return "timeout_ms", "must be positive"
        return None


@dataclass(frozen=True, slots=True)
class AuditConfig:
    """``audit:``; what each key guarantees is told in ``gateway/audit/__init__.py``."""

    file: Path | None = None
    enabled: bool = True
    required: bool = True  # a line that cannot be written fails /readyz and answers 503 until writing works again
    key_env: str | None = None  # env var holding the MAC key (base64url, >= 32 bytes): each line carries `mac`
    key_file: Path | None = None  # or a file holding it (`maas-gateway model keygen --out FILE` makes one)
    witness: str | None = None  # redis://... or a file path (relative to this file): the chain head after each flush
    max_pending_bytes: int = 16 * 1024 * 1024  # lines kept in memory while the file cannot be written

    def validate(self) -> tuple[str, str] | None:
        import re

        if self.key_env and self.key_file:
            return "key_file", "give key_env or key_file, not both"
        if self.key_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.key_env):
            return "key_env", "must be an environment variable name (the key itself never goes in the config)"
        if self.key_file is not None and not self.key_file.is_file():
            return "key_file", f"file not found: {self.key_file}"
        if self.witness is not None:
            scheme, sep, _ = self.witness.partition("://")
            if not self.witness.strip():
                return "witness", "must be a redis:// URL or a file path"
            if sep and scheme not in ("redis", "rediss", "unix"):
                return "witness", "must be a redis://, rediss:// or unix:// URL, or a file path"
        if self.max_pending_bytes < 65_536:
            return "max_pending_bytes", "must be at least 65536"
        return None

    def resolved(self, base_dir: Path) -> AuditConfig:
        """A file witness given as a relative path is relative to the config file, like every other path."""
        import dataclasses

        if self.witness is None or "://" in self.witness:
            return self
        return dataclasses.replace(self, witness=str(base_dir / Path(self.witness).expanduser()))


@dataclass(frozen=True, slots=True)
class HardeningConfig:
    """``hardening:``: the secret that makes output noise repeatable per caller and input (``gateway.noise``)."""

    noise_key_env: str | None = None  # env var holding it; unset: a per-process key (``check`` reports it)

    def validate(self) -> tuple[str, str] | None:
        import re

        if self.noise_key_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.noise_key_env):
            return "noise_key_env", "must be an environment variable name (the key itself never goes in the config)"
        return None


@dataclass(frozen=True, slots=True)
class RequiresConfig:
    min_free_ram_mb: int = 0
    min_free_disk_mb: int = 0


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    datatype: str
    shape: list[int]  # -1 for a variable dimension


@dataclass(frozen=True, slots=True)
class ModelConfig:
    backend: Section
    labels: dict[str, str] = field(default_factory=dict)
    requires: RequiresConfig | None = None
    schema: Path | None = None
    inputs: list[TensorSpec] | None = None
    max_tokens: int | None = None  # openai: cap on a request's max_tokens
    # Responses API: how long the gateway remembers who created a response id (then: 404 for everyone)
    responses_ttl_s: int = 30 * 86400
    max_body_bytes: int | None = None  # overrides server.max_body_bytes on this model's routes (audio uploads)
    name: str = ""  # filled from the mapping key

    def validate(self) -> tuple[str, str] | None:
        if self.schema is not None and not self.schema.is_file():
            return "schema", f"file not found: {self.schema}"
        if self.responses_ttl_s < 1:
            return "responses_ttl_s", "must be positive"
        if self.max_body_bytes is not None and self.max_body_bytes < 1:
            return "max_body_bytes", "must be positive"
        kind = self.backend.get("type")
        if not isinstance(kind, str):
            return "backend.type", "missing required key 'type'"
        return None


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    admin: AdminConfig | None = field(default_factory=AdminConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    policy: PolicyConfig | None = None
    quota: QuotaConfig | None = None
    audit: AuditConfig | None = None
    hardening: HardeningConfig = field(default_factory=HardeningConfig)
    models: dict[str, ModelConfig] = field(default_factory=dict)
    source: Source | None = field(default=None, metadata={"yaml": "__internal_source"})

    def validate(self) -> tuple[str, str] | None:
        if not (self.auth.jwt or self.auth.api_keys or self.auth.mtls):
            return "auth", "configure at least one of jwt, api_keys, mtls (every request must prove who it is)"
        if self.auth.mtls and not (self.server.tls and self.server.tls.client_ca_file):
            return "auth.mtls", "needs server.tls.client_ca_file"
        return None


def load_config(path: str | Path) -> GatewayConfig:
    """Load and fully validate a config file, or raise ``ConfigError`` (one line)."""
    data, source = load(path)
    if data is None:
        raise ConfigError("empty config file", file=source.file)
    if not isinstance(data, dict):
        raise source.error("", "expected a mapping at the top level")
    for key in list(data):
        if isinstance(key, str) and key.startswith("__internal"):
            raise source.error(key, "unknown key")
    config = build(GatewayConfig, data, "", source)
    return resolve(config, source)


def resolve(config: GatewayConfig, source: Source) -> GatewayConfig:
    """Name each model after its key, and resolve what is relative to the file; backends are not looked up here."""
    models: dict[str, ModelConfig] = {}
    for name, model in config.models.items():
        if not name or "/" in name or name.strip() != name:
            raise source.error(f"models.{name}", "model names must be non-empty and contain no '/' or spaces")
        models[name] = _with(model, name=name)
    audit = config.audit.resolved(source.base_dir) if config.audit is not None else None
    return _with(config, models=models, source=source, audit=audit)


def _with(obj: Any, **changes: Any) -> Any:
    import dataclasses

    return dataclasses.replace(obj, **changes)
