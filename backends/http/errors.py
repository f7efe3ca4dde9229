"""How a request to an upstream can fail, classified by how far it got.

The class decides two things in the backend: whether a retry elsewhere is
safe (only ``ConnectFailed``: no byte reached the upstream) and what the
failure says about the upstream's health (``eject_on``: ``connect`` or
``timeout``). ``str()`` of each is safe to show a client.
"""

from __future__ import annotations


class UpstreamError(Exception):
    """A request to an upstream that failed. ``str()`` is safe to show a client."""


class ConnectFailed(UpstreamError):
    """No connection to the upstream: nothing was sent, a retry elsewhere is safe."""


class ConnectTimeout(ConnectFailed):
    """Connecting (or waiting for a free pooled connection) took longer than allowed."""


class ReadTimeout(UpstreamError):
    """The upstream stayed silent too long (before its headers or between two body chunks),
    or a whole body did not arrive within its total deadline."""


class InvalidResponse(UpstreamError):
    """The upstream answered something that is not valid HTTP/1.1."""


class Disconnected(UpstreamError):
    """The upstream closed the connection before its answer was complete."""


class ResponseTooLarge(UpstreamError):
    """A body read whole is larger than the caller's cap (declared or counted): never buffered past it."""


class StreamExpired(UpstreamError):
    """A streamed body outlived its deadline (``max_stream_s``): ended by us, the upstream did nothing wrong."""


class InvalidRequestLine(ValueError):
    """The request we were asked to send would not be one request on the wire."""
