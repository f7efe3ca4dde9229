"""JWT bearer tokens: verify once with PyJWT, then serve from a bounded cache until ``exp``.

The order of checks is the defence:

1. size (``max_token_bytes``) and ASCII, before any parsing;
2. the header's ``alg`` must be on the configured allow-list ("none" never is);
3. the key is chosen by ``kid`` from configured keys only and must be of the
   type the algorithm needs (``jwks.VerificationKey.fits``): no HS/RS confusion;
4. PyJWT checks the signature with that one key and that one algorithm, then
   ``exp`` (required), ``nbf``, ``iat``, ``iss``, ``aud`` with ``leeway_s``.

Verified tokens are cached by the SHA-256 of the token string with their
``exp``: steady traffic pays one hash and one dict lookup, not a signature
check, and an entry is never served after ``exp + leeway``. The cache is an
``Lru`` (a miss costs a signature check, so the tokens in use must outlive a
flood of new ones). It is emptied whenever the key set changes, so a key
removed from the JWKS stops working at once. The same digest is the identity's
``cache_key``: the token fully determines the identity, so the policy decision
memo may share a decision between requests that carry it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import jwt as pyjwt

from ..cache import Lru
from ..errors import ConfigError
from ..pipeline import Identity
from . import UNSAFE_TEXT, AuthFailure, clean_roles
from .jwks import KeySet, RemoteJwks, StaticKeys, load_jwks_file, load_pem_file, secret_keyset

if TYPE_CHECKING:
    from ..config import JwtConfig
    from ..metrics import Metrics

log = logging.getLogger("maas.auth.jwt")

_MAX_KID_CHARS = 256

# PyJWT error -> (reason label, message for the client). Order matters: subclasses first.
_PYJWT_ERRORS: tuple[tuple[type[Exception], str, str], ...] = (
    (pyjwt.ExpiredSignatureError, "expired", "token expired"),
    (pyjwt.ImmatureSignatureError, "not_yet_valid", "token not yet valid"),
    (pyjwt.InvalidIssuerError, "wrong_issuer", "token issuer not accepted"),
    (pyjwt.InvalidAudienceError, "wrong_audience", "token audience not accepted"),
    (pyjwt.InvalidSignatureError, "bad_signature", "signature verification failed"),
    (pyjwt.InvalidAlgorithmError, "algorithm_not_allowed", "algorithm not allowed"),
    (pyjwt.InvalidKeyError, "key_mismatch", "token algorithm does not match its key"),
    (pyjwt.exceptions.InvalidIssuedAtError, "malformed", "token issued-at claim is invalid"),
    (pyjwt.exceptions.InvalidSubjectError, "bad_subject", "token subject is not a string"),
    (pyjwt.DecodeError, "malformed", "malformed token"),
    (pyjwt.InvalidTokenError, "invalid_token", "invalid token"),
)


class JwtVerifier:
    """Verifies bearer JWTs against the configured keys; owns the verified-token cache."""

    def __init__(self, config: JwtConfig, metrics: Metrics, keys: StaticKeys | RemoteJwks) -> None:
        self.config = config
        self.keys = keys
        self._metrics = metrics
        self._allowed = frozenset(config.algorithms)
        self._leeway = float(config.leeway_s)
        self._max_bytes = config.max_token_bytes
        self._cache: Lru[bytes, tuple[Identity, float]] = Lru(config.cache_size)
        self._cached_for: KeySet | None = None  # the key set the cache entries were verified with
        self._hit = metrics.auth_cache.labels(result="hit")
        self._miss = metrics.auth_cache.labels(result="miss")
        audience = config.audience
        self._audience = list(audience) if isinstance(audience, list) else audience
        self._options: dict[str, Any] = {"require": ["exp"], "verify_signature": True}
        self._decoder = pyjwt.PyJWT()

    @classmethod
    def from_config(cls, config: JwtConfig, metrics: Metrics) -> JwtVerifier:
        """Build the key source now, so a missing file or secret stops start-up (``ConfigError``)."""
        if config.hs256_secret_env:
            secret = os.environ.get(config.hs256_secret_env, "")
            if not secret:
                raise ConfigError(f"environment variable {config.hs256_secret_env} is not set or empty",
                                  key="auth.jwt.hs256_secret_env")
            keys: StaticKeys | RemoteJwks = StaticKeys(secret_keyset(secret.encode("utf-8")))
        elif config.jwks_file:
            keys = StaticKeys(load_jwks_file(config.jwks_file), config.jwks_file)
        elif config.public_key_file:
            keys = StaticKeys(load_pem_file(config.public_key_file), config.public_key_file, pem=True)
        elif config.jwks_url:
            keys = RemoteJwks(config.jwks_url, metrics, cache_s=config.jwks_cache_s,
                              min_refresh_s=config.jwks_min_refresh_s)
        else:
            raise ConfigError("needs one key source: jwks_file, jwks_url, public_key_file or hs256_secret_env",
                              key="auth.jwt")
        return cls(config, metrics, keys)

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        await self.keys.start()

    async def close(self) -> None:
        await self.keys.close()

    def ready(self) -> str | None:
        return self.keys.ready()

    def reload(self) -> None:
        """Re-read a JWKS or PEM file (``ConfigError`` keeps the old keys)."""
        if isinstance(self.keys, StaticKeys):
            self.keys.reload()

    # -- the hot path --------------------------------------------------------

    def cached(self, token: str) -> Identity | None:
        """The identity of an already verified, unexpired token, or None (then call ``verify``)."""
        keyset = self.keys.keyset
        if keyset is not self._cached_for:
            self._cache.clear()
            self._cached_for = keyset
        if len(token) > self._max_bytes or not token.isascii():
            return None  # verify() refuses it with the reason
        digest = hashlib.sha256(token.encode("ascii")).digest()
        entry = self._cache.get(digest)
        if entry is not None:
            if time.time() < entry[1]:
                self._hit.inc()
                return entry[0]
            self._cache.pop(digest)
        self._miss.inc()
        return None

    async def verify(self, token: str) -> Identity:
        """Verify ``token`` fully; on an unknown kid with a JWKS URL, refresh (rate-limited) and retry once."""
        try:
            return self.verify_now(token)
        except _UnknownKid:
            if isinstance(self.keys, RemoteJwks):
                await self.keys.refresh_for_unknown_kid()
                try:
                    return self.verify_now(token)
                except _UnknownKid:
                    pass
            raise AuthFailure("unknown_kid", "unknown key id") from None

    def verify_now(self, token: str) -> Identity:
        """Synchronous verification against the keys in hand; caches the result."""
        if len(token) > self._max_bytes:
            raise AuthFailure("too_large", f"token larger than {self._max_bytes} bytes")
        if not token.isascii() or token.count(".") != 2:
            raise AuthFailure("malformed", "malformed token")
        keyset = self.keys.keyset
        try:
            header = pyjwt.get_unverified_header(token)
        except pyjwt.PyJWTError:
            raise AuthFailure("malformed", "malformed token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._allowed:
            raise AuthFailure("algorithm_not_allowed", "algorithm not allowed")
        kid = header.get("kid")  # jku, x5u, x5c and jwk are deliberately never read
        if kid is not None and (not isinstance(kid, str) or len(kid) > _MAX_KID_CHARS):
            raise AuthFailure("malformed", "malformed token")
        key = keyset.select(kid, alg)
        if key is None:
            raise _UnknownKid
        claims = self._decode(token, key.key, alg)
        digest = hashlib.sha256(token.encode("ascii")).digest()
        identity = self._identity(claims, kid, digest)
        self._remember(digest, identity, claims, keyset)
        return identity

    def _decode(self, token: str, key: Any, alg: str) -> dict[str, Any]:
        try:
            return self._decoder.decode(token, key=key, algorithms=[alg], options=self._options,  # type: ignore[arg-type]
                                        audience=self._audience, issuer=self.config.issuer, leeway=self._leeway)
        except pyjwt.MissingRequiredClaimError as exc:
            raise AuthFailure("missing_claim", f"token lacks the required '{exc.claim}' claim") from None
        except pyjwt.PyJWTError as exc:
            for cls, reason, message in _PYJWT_ERRORS:
                if isinstance(exc, cls):
                    raise AuthFailure(reason, message) from None
            raise AuthFailure("invalid_token", "invalid token") from None
        except Exception:  # a crypto backend surprise must be a 401, never a 500
            log.exception("unexpected error verifying a token")
            raise AuthFailure("invalid_token", "invalid token") from None

    def _identity(self, claims: dict[str, Any], kid: str | None, digest: bytes) -> Identity:
        subject = claims.get(self.config.subject_claim)
        if not isinstance(subject, str) or not subject or UNSAFE_TEXT.search(subject):
            raise AuthFailure("bad_subject", f"token has no valid '{self.config.subject_claim}' claim")
        roles = clean_roles(_claim(claims, self.config.roles_claim))
        merged = dict(claims)
        merged["sub"] = subject
        merged["roles"] = list(roles)
        return Identity(subject=subject, roles=roles, claims=MappingProxyType(merged), method="jwt", credential_id=kid,
                        cache_key="jwt:" + digest.hex())

    def _remember(self, digest: bytes, identity: Identity, claims: dict[str, Any], keyset: KeySet) -> None:
        if self._cache.maxsize == 0 or keyset is not self.keys.keyset:
            return  # the keys changed while we verified: do not cache under the new set
        if keyset is not self._cached_for:
            self._cache.clear()
            self._cached_for = keyset
        try:
            until = float(claims["exp"]) + self._leeway
        except (TypeError, ValueError, OverflowError):
            return
        self._cache.put(digest, (identity, until))


class _UnknownKid(Exception):
    """The token names a kid we do not hold (yet)."""


def _claim(claims: dict[str, Any], name: str) -> Any:
    """A claim by name; a dotted name walks nested objects (Keycloak's ``realm_access.roles``)."""
    if name in claims or "." not in name:
        return claims.get(name)
    value: Any = claims
    for part in name.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value
