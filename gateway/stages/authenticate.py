"""Authenticate: every request proves who it is before anything else looks at it.

Credentials are read from headers only — ``Authorization: Bearer <JWT | mk_ key>``
or ``X-API-Key`` — never from the query string (URLs end up in logs, browser
history and Referer headers). A credential header sent twice never gets here:
the framing stage refused it (400), since taking the first would let a proxy
and the gateway disagree about who called.
With ``auth.mtls`` configured, a verified client certificate with no token
authenticates as its subject's common name: the certificate's subject must
hold exactly one CN, taken verbatim (``ctx.request.client_subject``, parsed
once from the certificate by the door) and refused if it is empty, holds a
control character or an ``=`` (a CN that reads like a distinguished name is
no name). A token, when present, always wins and is always verified. Every
failure is a 401 whose message names what was wrong, never the key, and is
counted by a fixed reason label.
"""

from __future__ import annotations

import logging
from types import MappingProxyType
from typing import TYPE_CHECKING

from ..auth import UNSAFE_TEXT, AuthFailure
from ..auth.api_keys import KEY_PREFIX, ApiKeyFile
from ..auth.jwt import JwtVerifier
from ..errors import ConfigError, InvalidRequest, Unauthenticated
from ..pipeline import Identity, RequestContext

if TYPE_CHECKING:
    from ..config import MtlsAuthConfig
    from ..metrics import Metrics
    from ..request import CertificateSubject
    from ..services import Services

log = logging.getLogger("maas.auth")


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
        request = ctx.request
        headers = request.headers
        authorization = headers.get("Authorization")
        api_key = headers.get("X-API-Key")
        if authorization is not None and api_key is not None:
            raise InvalidRequest("send one credential: Authorization or X-API-Key, not both")
        try:
            if authorization is not None:
                token = bearer_token(authorization)
                jwt = self.jwt
                if token.startswith(KEY_PREFIX):
                    ctx.identity = self._api_key(token)
                elif jwt is None:
                    raise AuthFailure("jwt_disabled", "bearer tokens (JWT) are not accepted here")
                else:  # a verified token is found without a signature check (or a coroutine)
                    ctx.identity = jwt.cached(token) or await jwt.verify(token)
            elif api_key is not None:
                ctx.identity = self._api_key(api_key.strip())
            elif self.mtls is not None and request.client_subject is not None:
                ctx.identity = self._certificate(request.client_subject)
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

    def _certificate(self, subject: CertificateSubject) -> Identity:
        cn = certificate_name(subject)
        if cn is None:
            raise AuthFailure("bad_certificate", "client certificate subject has no single plain common name")
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


def certificate_name(subject: CertificateSubject) -> str | None:
    """The name a client certificate authenticates as: its subject's only CN, verbatim; None when it has none,
    several, or one that is empty, holds a control character or an ``=``."""
    cn = subject.common_name
    if not cn or "=" in cn or UNSAFE_TEXT.search(cn):
        return None
    return cn


def build(services: Services) -> Authenticate:
    """Always a stage (never None): with nothing configured, every request is refused."""
    auth = services.config.auth
    jwt = JwtVerifier.from_config(auth.jwt, services.metrics) if auth.jwt else None
    api_keys = ApiKeyFile(auth.api_keys.file) if auth.api_keys else None
    return Authenticate(services.metrics, jwt=jwt, api_keys=api_keys, mtls=auth.mtls)
