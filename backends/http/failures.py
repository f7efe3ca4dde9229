"""What an upstream failure means: the client's error, the upstream's score, and whether to retry.

A failure is read in one of two phases. *Sending* (connecting, writing the
request, waiting for the response head): a retry elsewhere is safe only when
nothing reached the upstream (``ConnectFailed``), or for an idempotent method.
*Reading* (a body read whole after its head arrived): never retried, the
answer has started. The classification is a table per phase so that a new
``UpstreamError`` subclass gets one row, not a branch in every ``except``
ladder; the first row whose class matches wins, so subclasses come first.
"""

from __future__ import annotations

from gateway.errors import BackendError, BackendTimeout

from .errors import (ConnectFailed, ConnectTimeout, InvalidResponse, ReadTimeout, ResponseTooLarge,
                     UpstreamError)

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS"})
CONNECT_FAILED = "upstream connection failed"
INVALID_ANSWER = "upstream sent an invalid response"
TIMED_OUT = "upstream timed out"
TOO_LARGE = "upstream answer too large"

# retry policies
ALWAYS, NEVER, IF_IDEMPOTENT = "always", "never", "idempotent"

# (failure class, outcome for metrics and eject_on, retry policy, client message, counts against the upstream)
_Row = tuple[type[UpstreamError], str, str, str, bool]
_SENDING: tuple[_Row, ...] = (
    (ConnectTimeout, "timeout", ALWAYS, TIMED_OUT, True),
    (ConnectFailed, "error", ALWAYS, CONNECT_FAILED, True),
    (ReadTimeout, "timeout", NEVER, TIMED_OUT, True),  # the request was sent
    (InvalidResponse, "error", IF_IDEMPOTENT, INVALID_ANSWER, True),
    (UpstreamError, "error", IF_IDEMPOTENT, CONNECT_FAILED, True),
)
_READING: tuple[_Row, ...] = (
    (ReadTimeout, "timeout", NEVER, TIMED_OUT, True),
    (ResponseTooLarge, "error", NEVER, TOO_LARGE, False),  # our limit, not the upstream's health
    (UpstreamError, "error", NEVER, INVALID_ANSWER, True),
)


class Failure(Exception):
    """An attempt that failed: its outcome, whether a retry is safe, the client's error, and blame.

    ``blames``: whether ``eject_on`` may count it against the upstream; when
    False the upstream is only released, never scored.
    """

    def __init__(self, outcome: str, retryable: bool, error: Exception, blames: bool = True) -> None:
        super().__init__(str(error))
        self.outcome, self.retryable, self.error, self.blames = outcome, retryable, error, blames


def _classify(rows: tuple[_Row, ...], exc: UpstreamError, method: str) -> Failure:
    for cls, outcome, retry, message, blames in rows:
        if isinstance(exc, cls):
            retryable = retry == ALWAYS or (retry == IF_IDEMPOTENT and method in IDEMPOTENT)
            error = BackendTimeout(message) if outcome == "timeout" else BackendError(message)
            return Failure(outcome, retryable, error, blames)
    raise AssertionError("the last row of each table is UpstreamError")  # pragma: no cover


def while_sending(exc: UpstreamError, method: str) -> Failure:
    """A failure before the upstream's answer head came."""
    return _classify(_SENDING, exc, method)


def while_reading(exc: UpstreamError) -> Failure:
    """A failure while reading an answer's body whole (never retried)."""
    return _classify(_READING, exc, "")
