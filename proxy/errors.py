"""The proxy's own errors, mapped to HTTP once, at the boundary (:mod:`proxy.server`).

::

    ProxyError                      -> JSON {"error": {type, message, request_id, route}}
    ├── BadRequest          400 bad_request
    ├── ClientAuthError     401/403 unauthorized / forbidden
    ├── NoRoute             404 no_route
    ├── BodyTooLarge        413 body_too_large
    ├── BudgetExceeded      429 budget_exceeded (+ Retry-After)
    ├── RateLimited         429 rate_limited (+ Retry-After)
    ├── UpstreamError       502 upstream_error    (connect error, reset; attempt-level)
    ├── InvalidResponse     502 invalid_response  (validate failed; attempt-level)
    ├── CircuitOpen         503 circuit_open      (attempt-level: the tier is skipped)
    ├── NoTierAvailable     503 no_tier_available
    ├── StateUnavailable    503 state_unavailable
    └── Timeout             504 timeout           (names the timer that fired)

Attempt-level errors (``attempt=True``) are what the classifier in :mod:`proxy.classify`
turns into retry / next tier; the others end the request where they are raised.
"""

from __future__ import annotations

from typing import ClassVar


class ProxyError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal_error"
    #: a failure of one upstream attempt, for the classifier (retry / next tier)
    attempt: ClassVar[bool] = False

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class BadRequest(ProxyError):
    status, type = 400, "bad_request"


class ClientAuthError(ProxyError):
    status, type = 401, "unauthorized"

    def __init__(self, message: str, *, forbidden: bool = False) -> None:
        super().__init__(message)
        if forbidden:
            self.status, self.type = 403, "forbidden"  # type: ignore[misc]


class NoRoute(ProxyError):
    status, type = 404, "no_route"


class BodyTooLarge(ProxyError):
    status, type = 413, "body_too_large"


class BudgetExceeded(ProxyError):
    status, type = 429, "budget_exceeded"


class RateLimited(ProxyError):
    status, type, attempt = 429, "rate_limited", True


class UpstreamError(ProxyError):
    """Connect failure (``kind="connect_error"``) or reset before the first byte (``"reset"``)."""

    status, type, attempt = 502, "upstream_error", True

    def __init__(self, message: str, *, kind: str = "connect_error") -> None:
        super().__init__(message)
        self.kind = kind


class InvalidResponse(ProxyError):
    status, type, attempt = 502, "invalid_response", True


class CircuitOpen(ProxyError):
    status, type, attempt = 503, "circuit_open", True


class NoTierAvailable(ProxyError):
    status, type = 503, "no_tier_available"


class StateUnavailable(ProxyError):
    status, type = 503, "state_unavailable"


class Timeout(ProxyError):
    """A timer fired; ``timer`` is attempt | first_byte | idle | total."""

    status, type, attempt = 504, "timeout", True

    def __init__(self, timer: str, seconds: float) -> None:
        super().__init__(f"the {timer} timeout ({seconds:g}s) expired")
        self.timer = timer


class Rejected(ProxyError):
    """A 2xx reply that failed the tier's ``accept`` condition; carries the reply."""

    status, type, attempt = 502, "invalid_response", True
    #: what the attempt record and logs call it (``type`` is the HTTP error, if one is made)
    kind = "rejected"

    def __init__(self, message: str, reply: object) -> None:
        super().__init__(message)
        self.reply = reply
