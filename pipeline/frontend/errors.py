"""How a request can fail, by whose fault: the transports map each to their own answer."""
from __future__ import annotations


class Unavailable(Exception):
    """The request could not be served for a reason of the server's (gRPC UNAVAILABLE)."""


class Overloaded(Exception):
    """Admission refused (gRPC RESOURCE_EXHAUSTED)."""


class Failed(Exception):
    """The pipeline rejected the request; str() is the client-facing error (success=false)."""


# the `reason` label of lipsync_request_failures
FAILURE_REASONS: dict[type, str] = {Failed: "failed", Overloaded: "overloaded",
                                    Unavailable: "unavailable", TimeoutError: "timeout"}
