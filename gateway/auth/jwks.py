"""The keys that may verify a token, and where they come from.

A ``VerificationKey`` knows its own type (RSA, EC curve, OKP curve or an HMAC
secret) and verifies only the algorithms of that type: an RSA public key can
never be fed to HS256 as a "secret" (the classic algorithm-confusion attack),
and a P-256 key never verifies an ES512 token. Sources:

* a JWKS file or a PEM public key file, read at start-up and on reload;
* a JWKS URL, fetched with aiohttp, cached, refreshed in the background and on
  an unknown ``kid`` — but at most once per ``jwks_min_refresh_s``, so a flood
  of tokens with random ``kid``s cannot turn the gateway into a traffic
  amplifier against the identity provider. A failing fetch keeps the last good keys;
* an HMAC secret from an environment variable.

Nothing here ever looks at a token's ``jku``, ``x5u``, ``x5c`` or ``jwk`` header:
keys come only from the configuration.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Mapping

import orjson
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from ..errors import ConfigError
from . import AuthFailure

if TYPE_CHECKING:
    import aiohttp

    from ..metrics import Metrics

log = logging.getLogger("maas.auth.jwks")

MIN_RSA_BITS = 2048
JWKS_MAX_BYTES = 1_048_576  # 1 MiB: a JWKS is a few KB; more is not a key set
JWKS_TIMEOUT_S = 5.0

# algorithm -> (key type, curve or None): the only keys that may verify it
ALGORITHM_KEY_TYPES: Mapping[str, tuple[str, str | None]] = {
    **{a: ("RSA", None) for a in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")},
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "ES512": ("EC", "P-521"),
    "EdDSA": ("OKP", None),
    **{a: ("oct", None) for a in ("HS256", "HS384", "HS512")},
}
_EC_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}


@dataclass(frozen=True, slots=True)
class VerificationKey:
    kty: str  # "RSA" | "EC" | "OKP" | "oct"
    crv: str | None  # EC: P-256/P-384/P-521; OKP: Ed25519/Ed448
    key: Any  # a cryptography public key object, or the HMAC secret bytes
    kid: str | None = None
    alg: str | None = None  # the JWK's own "alg": when set, the only algorithm it verifies

    def fits(self, alg: str) -> bool:
        """True when this key may verify a token signed with ``alg``."""
        need = ALGORITHM_KEY_TYPES.get(alg)
        if need is None or need[0] != self.kty:
            return False
        if need[1] is not None and need[1] != self.crv:
            return False
        return self.alg is None or self.alg == alg


@dataclass(frozen=True, slots=True)
class KeySet:
    """An immutable set of keys, swapped whole when a source changes."""

    by_kid: Mapping[str, VerificationKey] = field(default_factory=dict)
    keys: tuple[VerificationKey, ...] = ()
    ignore_kid: bool = False  # a single PEM key or secret: the token's kid is irrelevant
    fingerprint: str = ""

    def select(self, kid: str | None, alg: str) -> VerificationKey | None:
        """The key for this token, or None when its ``kid`` is unknown (the caller may refresh).

        Raises ``AuthFailure`` when the key exists but cannot verify ``alg``.
        """
        if kid is not None and not self.ignore_kid:
            key = self.by_kid.get(kid)
            if key is None:
                return None
            if not key.fits(alg):
                raise AuthFailure("key_mismatch", "token algorithm does not match its key")
            return key
        fitting = [k for k in self.keys if k.fits(alg)]
        if len(fitting) == 1:
            return fitting[0]
        if not fitting:
            raise AuthFailure("key_mismatch", "no key for the token's algorithm")
        raise AuthFailure("unknown_kid", "token has no key id")


EMPTY = KeySet()


def public_key(obj: Any, *, kid: str | None = None, alg: str | None = None, where: str = "") -> VerificationKey:
    """Wrap a cryptography public key, refusing private keys and weak or unsupported ones."""
    if isinstance(obj, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        raise ValueError("is a private key; give the public key only")
    if isinstance(obj, rsa.RSAPublicKey):
        if obj.key_size < MIN_RSA_BITS:
            raise ValueError(f"RSA key of {obj.key_size} bits is too weak (at least {MIN_RSA_BITS})")
        return VerificationKey("RSA", None, obj, kid, alg)
    if isinstance(obj, ec.EllipticCurvePublicKey):
        crv = _EC_CURVES.get(obj.curve.name)
        if crv is None:
            raise ValueError(f"unsupported EC curve {obj.curve.name}")
        return VerificationKey("EC", crv, obj, kid, alg)
    if isinstance(obj, ed25519.Ed25519PublicKey):
        return VerificationKey("OKP", "Ed25519", obj, kid, alg)
    if isinstance(obj, ed448.Ed448PublicKey):
        return VerificationKey("OKP", "Ed448", obj, kid, alg)
    raise ValueError(f"unsupported key type {type(obj).__name__}")


def key_from_jwk(jwk: Mapping[str, Any]) -> VerificationKey | None:
    """One JWK -> a key, or None for a key that is not for signatures (``use: enc``).

    Raises ``ValueError`` for a broken or unsafe key (private, symmetric, weak).
    """
    if not isinstance(jwk, Mapping):
        raise ValueError("a key must be a JSON object")
    kty, kid, alg, use = jwk.get("kty"), jwk.get("kid"), jwk.get("alg"), jwk.get("use")
    if kid is not None and not isinstance(kid, str):
        raise ValueError("kid must be a string")
    if use is not None and use != "sig":
        return None
    if alg is not None and alg not in ALGORITHM_KEY_TYPES:
        return None  # an encryption key ("RSA-OAEP") or an algorithm we do not verify
    if kty == "oct":
        raise ValueError("symmetric (oct) keys do not belong in a JWKS; use hs256_secret_env")
    if "d" in jwk:
        raise ValueError("is a private key; publish the public key only")
    loaders: dict[str, type[RSAAlgorithm] | type[ECAlgorithm] | type[OKPAlgorithm]] = {
        "RSA": RSAAlgorithm, "EC": ECAlgorithm, "OKP": OKPAlgorithm}
    loader = loaders.get(kty)  # type: ignore[arg-type]
    if loader is None:
        raise ValueError(f"unsupported kty {kty!r}")
    try:
        obj = loader.from_jwk(dict(jwk))
    except Exception as exc:  # PyJWT raises InvalidKeyError, cryptography ValueError
        raise ValueError(f"not a valid {kty} key ({exc})") from None
    key = public_key(obj, kid=kid, alg=alg)
    if alg is not None and not key.fits(alg):
        raise ValueError(f"alg {alg} does not fit a {kty} {key.crv or ''} key".replace("  ", " "))
    return key


def parse_jwks(doc: Any, *, strict: bool, where: str) -> KeySet:
    """A JWKS document -> ``KeySet``.

    ``strict`` (a file a person edits): any bad key is a ``ConfigError``.
    Not strict (a URL we do not control): bad keys are skipped with a warning,
    so one odd key at the identity provider does not lock everyone out.
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ConfigError('expected a JSON object with a "keys" list', file=where)
    by_kid: dict[str, VerificationKey] = {}
    keys: list[VerificationKey] = []
    for i, jwk in enumerate(doc["keys"]):
        try:
            key = key_from_jwk(jwk)
        except ValueError as exc:
            if strict:
                raise ConfigError(str(exc), file=where, key=f"keys[{i}]") from None
            log.warning("%s: keys[%d] skipped: %s", where, i, exc)
            continue
        if key is None:
            continue
        if key.kid is not None:
            if key.kid in by_kid:
                if strict:
                    raise ConfigError(f"duplicate kid {key.kid!r}", file=where, key=f"keys[{i}]")
                log.warning("%s: keys[%d] skipped: duplicate kid", where, i)
                continue
            by_kid[key.kid] = key
        keys.append(key)
    if not keys and strict:
        raise ConfigError("no usable signing keys", file=where)
    fingerprint = hashlib.sha256(orjson.dumps(doc["keys"], option=orjson.OPT_SORT_KEYS)).hexdigest()
    return KeySet(by_kid=by_kid, keys=tuple(keys), fingerprint=fingerprint)


def load_jwks_file(path: Path) -> KeySet:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read JWKS: {getattr(exc, 'strerror', None) or exc}", file=str(path)) from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"invalid JSON: {exc.msg}", file=str(path), line=exc.lineno) from None
    return parse_jwks(doc, strict=True, where=str(path))


def load_pem_file(path: Path) -> KeySet:
    """A PEM public key (or an X.509 certificate, whose public key is used)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read public key: {exc.strerror or exc}", file=str(path)) from None
    if b"PRIVATE KEY" in data:
        raise ConfigError("is a private key; give the public key only", file=str(path))
    try:
        obj = x509.load_pem_x509_certificate(data).public_key() if b"BEGIN CERTIFICATE" in data else load_pem_public_key(data)
        key = public_key(obj)
    except ValueError as exc:
        raise ConfigError(f"not a usable PEM public key: {exc}", file=str(path)) from None
    return KeySet(keys=(key,), ignore_kid=True, fingerprint=hashlib.sha256(data).hexdigest())


def secret_keyset(secret: bytes) -> KeySet:
    return KeySet(keys=(VerificationKey("oct", None, secret),), ignore_kid=True,
                  fingerprint=hashlib.sha256(secret).hexdigest())


class StaticKeys:
    """Keys from a file (JWKS or PEM) or a secret: loaded now, re-read on reload."""

    def __init__(self, keyset: KeySet, path: Path | None = None, *, pem: bool = False) -> None:
        self.keyset = keyset
        self._path, self._pem = path, pem

    def ready(self) -> str | None:
        return None

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def reload(self) -> None:
        """Re-read the file; raises ``ConfigError`` and keeps the old keys when it is bad."""
        if self._path is not None:
            self.keyset = load_pem_file(self._path) if self._pem else load_jwks_file(self._path)


class RemoteJwks:
    """Keys from a JWKS URL: cached, refreshed periodically and (rate-limited) on an unknown kid."""

    def __init__(self, url: str, metrics: Metrics, *, cache_s: float, min_refresh_s: float,
                 timeout_s: float = JWKS_TIMEOUT_S, session: aiohttp.ClientSession | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.url = url
        # The seam for tests (a fake clock instead of waiting out min_refresh_s / cache_s); read once per fetch.
        self.clock = clock
        self.sleep = sleep
        self.keyset: KeySet = EMPTY
        self._metrics = metrics
        self._cache_s = max(cache_s, min_refresh_s, 1.0)
        self._min_refresh_s = min_refresh_s
        self._timeout_s = timeout_s
        self._session = session
        self._own_session = session is None
        self._last_attempt = -math.inf  # self.clock() when the last fetch started
        self._inflight: asyncio.Future[bool] | None = None
        self._loader: asyncio.Task[None] | None = None
        self.fetches = 0  # fetches started (for tests and logs)

    def ready(self) -> str | None:
        return None if self.keyset.keys else f"JWKS not loaded from {self.url}"

    async def start(self) -> None:
        """Fetch once now (a failure is logged, not fatal: /readyz says why), then keep fresh."""
        await self.refresh()
        if self._loader is None:
            self._loader = asyncio.create_task(self._keep_fresh(), name="jwks-refresh")

    async def close(self) -> None:
        if self._loader is not None:
            self._loader.cancel()
            try:
                await self._loader
            except asyncio.CancelledError:
                pass
            self._loader = None
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def refresh_for_unknown_kid(self) -> None:
        """Fetch again unless a fetch started less than ``min_refresh_s`` ago (then join it if running)."""
        if self._inflight is not None:
            await asyncio.shield(self._inflight)
            return
        if self.clock() - self._last_attempt < self._min_refresh_s:
            return
        await self.refresh()

    async def refresh(self) -> bool:
        """One fetch at a time: concurrent callers share the fetch in flight."""
        if self._inflight is None:
            self._last_attempt = self.clock()
            self.fetches += 1
            task = asyncio.ensure_future(self._fetch())
            self._inflight = task
            task.add_done_callback(self._clear_inflight)
            return await asyncio.shield(task)
        return await asyncio.shield(self._inflight)

    def _clear_inflight(self, _task: asyncio.Future[bool]) -> None:
        self._inflight = None

    async def _keep_fresh(self) -> None:
        while True:
            await self.sleep(self._cache_s if self.keyset.keys else self._min_refresh_s)
            await self.refresh()

    async def _fetch(self) -> bool:
        import aiohttp

        try:
            if self._session is None:
                self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout_s))
            async with self._session.get(self.url, headers={"Accept": "application/json"},
                                         timeout=aiohttp.ClientTimeout(total=self._timeout_s)) as resp:
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}")
                body = bytearray()
                async for chunk in resp.content.iter_chunked(65536):
                    body += chunk
                    if len(body) > JWKS_MAX_BYTES:
                        raise ValueError("response larger than 1 MiB")
            keyset = parse_jwks(orjson.loads(bytes(body)), strict=False, where=self.url)
            if not keyset.keys:
                raise ValueError("no usable signing keys")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # network, HTTP, JSON, key errors: keep the last good keys
            reason = str(exc) if isinstance(exc, (ValueError, ConfigError)) else type(exc).__name__
            log.warning("JWKS fetch from %s failed (%s); keeping %d known key(s)", self.url, reason, len(self.keyset.keys))
            self._metrics.jwks_refreshes.labels(result="error").inc()
            return False
        if keyset.fingerprint != self.keyset.fingerprint:
            self.keyset = keyset
            log.info("JWKS from %s: %d key(s)", self.url, len(keyset.keys))
        self._metrics.jwks_refreshes.labels(result="ok").inc()
        return True
