"""The requests the data planes refuse on purpose, with the status and JSON body clients get.

The ext_proc router raises them per request; the native plane's config generator renders the same
bodies into Envoy's direct responses, so a client sees one error format whichever plane serves it.
"""

from __future__ import annotations

import json


class RoutingError(Exception):
    """A request we refuse on purpose; mapped once to an Envoy ImmediateResponse."""

    status = 400
    code = "invalid_request_error"

    def __init__(self, message: str, valid_variants: list[str]) -> None:
        super().__init__(message)
        self.valid_variants = valid_variants

    def body(self) -> bytes:
        return json.dumps(
            {
                "error": {
                    "message": str(self),
                    "type": self.code,
                    "valid_variants": self.valid_variants,
                }
            }
        ).encode()


class UnknownVariant(RoutingError):
    status = 400


class ForcingNotAllowed(RoutingError):
    status = 403
    code = "permission_error"
