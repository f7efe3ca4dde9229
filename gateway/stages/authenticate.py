"""Authenticate: every request proves who it is before anything else looks at it.

Credentials are read from headers only — ``Authorization: Bearer <JWT | mk_ key>``
or ``X-API-Key`` — never from the query string (URLs end up in logs, browser
history and Referer headers). A header sent twice is refused outright (400):
taking the first would let a proxy and the gateway disagree about who called.
With ``auth.mtls`` configured, a verified client certificate with no token
authenticates as its subject's CN; a token, when present, always wins and is
always verified. Every failure is a 401 whose message names what was wrong,
never the key, and is counted by a fixed reason label.
"""

from __future__ import annotations

import logging
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ..auth import UNSAFE_TEXT, AuthFailure
from ..auth.api_keys import KEY_PREFIX, ApiKeyFile
from ..auth.jwt import JwtVerifier
from ..errors import ConfigError, InvalidRequest, Unauthenticated
from ..pipeline import Identity, RequestContext

if TYPE_CHECKING:
    from ..config import MtlsAuthConfig
    from ..metrics import Metrics
    from ..services import Services

log = logging.getLogger("maas.auth")

_EMPTY: tuple[str, ...] = ()


class Authenticate:
    name = "authenticate"

    def __init__(self, metrics: Metrics, *, jwt: JwtVerifier | None = None, api_keys: ApiKeyFile | None = None,
                 mtls: MtlsAuthConfig | None = None) -> None:
        self.jwt = jwt
        self.api_keys = api_keys
        self.mtls = mtls
        self._metrics = metrics
        self._mtls_roles = tuple(dict.fromkeys(mtls.roles)) if mtls else ()

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        if self.jwt is not None:
            await self.jwt.start()

    async def close(self) -> None:
        if self.jwt is not None:
            await self.jwt.close()

    def ready(self) -> str | None:
        return self.jwt.ready() if self.jwt is not None else None

    async def reload(self) -> None:
        """SIGHUP: re-read the API keys file (and a JWKS/PEM file); a bad file keeps the old keys."""
        if self.api_keys is not None:
            try:
                self.api_keys.reload()
            except ConfigError as exc:
                self._metrics.api_key_reloads.labels(result="error").inc()
                log.error("API keys not reloaded, keeping %d key(s): %s", len(self.api_keys.store), exc)
            else:
                self._metrics.api_key_reloads.labels(result="ok").inc()
                log.info("API keys reloaded: %d key(s)", len(self.api_keys.store))
        if self.jwt is not None:
            try:
                self.jwt.reload()
            except ConfigError as exc:
                log.error("JWT keys not reloaded, keeping the old ones: %s", exc)

    # -- per request ---------------------------------------------------------

    async def __call__(self, ctx: RequestContext) -> None:
        headers = ctx.request.headers
        authorization = headers.getall("Authorization", _EMPTY)
        api_key = headers.getall("X-API-Key", _EMPTY)
        if len(authorization) > 1:
            raise InvalidRequest("the Authorization header was sent more than once")
        if len(api_key) > 1:
            raise InvalidRequest("the X-API-Key header was sent more than once")
        if authorization and api_key:
            raise InvalidRequest("send one credential: Authorization or X-API-Key, not both")
        try:
            if authorization:
                token = bearer_token(authorization[0])
                jwt = self.jwt
                if token.startswith(KEY_PREFIX):
                    ctx.identity = self._api_key(token)
                elif jwt is None:
                    raise AuthFailure("jwt_disabled", "bearer tokens (JWT) are not accepted here")
                else:  # a verified token is found without a signature check (or a coroutine)
                    ctx.identity = jwt.cached(token) or await jwt.verify(token)
            elif api_key:
                ctx.identity = self._api_key(api_key[0].strip())
            elif self.mtls is not None and ctx.mtls and ctx.client_cert_subject:
                ctx.identity = self._certificate(ctx.client_cert_subject)
            else:
                raise AuthFailure("missing", "missing credentials")
        except AuthFailure as failure:
            self._metrics.auth_failures.labels(reason=failure.reason).inc()
            error = None if failure.reason in ("missing", "unsupported_scheme") else "invalid_token"
            raise Unauthenticated(failure.message, error=error) from None

    def _api_key(self, key: str) -> Identity:
        if self.api_keys is None:
            raise AuthFailure("api_keys_disabled", "API keys are not accepted here")
        return self.api_keys.store.authenticate(key)

    def _certificate(self, cert_subject: Any) -> Identity:
        cn = common_name(cert_subject)
        if cn is None:
            raise AuthFailure("bad_certificate", "client certificate subject has no single common name")
        claims = MappingProxyType({"sub": cn, "roles": list(self._mtls_roles)})
        return Identity(subject=cn, roles=self._mtls_roles, claims=claims, method="mtls", credential_id=None,
                        cache_key="mtls:" + cn)  # the CN and the configured roles are all the identity holds


def bearer_token(value: str) -> str:
    """The token of an ``Authorization: Bearer <token>`` value; ``AuthFailure`` for another scheme or none."""
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise AuthFailure("unsupported_scheme", "expected an Authorization: Bearer credential")
    token = token.strip()
    if not token:
        raise AuthFailure("malformed", "empty bearer token")
    return token


def common_name(subject: Any) -> str | None:
    """The single CN of a certificate subject, or None when it has none, several, or an unsafe one.

    Accepts the CN itself (what ``gateway.app`` sets), an RFC 4514 distinguished
    name (``CN=alice,O=Acme``, as cryptography's ``Name.rfc4514_string()``
    writes it) or the tuple form of ``ssl.SSLSocket.getpeercert()['subject']``.
    """
    names: list[str] = []
    if isinstance(subject, str):
        names = _rfc4514_common_names(subject) if "=" in subject else [subject]
    elif isinstance(subject, (tuple, list)):
        for rdn in subject:
            for pair in rdn if isinstance(rdn, (tuple, list)) else ():
                if isinstance(pair, (tuple, list)) and len(pair) == 2 and pair[0] == "commonName":
                    names.append(str(pair[1]))
    if len(names) != 1 or not names[0] or UNSAFE_TEXT.search(names[0]):
        return None
    return names[0]


def _rfc4514_common_names(text: str) -> list[str]:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        parsed = x509.Name.from_rfc4514_string(text)
    except ValueError:
        return []  # neither a plain CN nor a distinguished name: fail closed
    return [str(a.value) for a in parsed.get_attributes_for_oid(NameOID.COMMON_NAME)]


def build(services: Services) -> Authenticate:
    """Always a stage (never None): with nothing configured, every request is refused."""
    auth = services.config.auth
    jwt = JwtVerifier.from_config(auth.jwt, services.metrics) if auth.jwt else None
    api_keys = ApiKeyFile(auth.api_keys.file) if auth.api_keys else None
    return Authenticate(services.metrics, jwt=jwt, api_keys=api_keys, mtls=auth.mtls)
