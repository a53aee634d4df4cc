"""Bearer tokens: the one check of the dashboard's actions and captured texts, and of feedback.

An ``Authorization`` header comes from whoever reaches the port, so every malformed form of it
(absent, empty, another scheme, bytes that are not UTF-8, several headers at once) is a refusal
like a wrong token, never an exception: the servers answer 401, not 500. The comparison runs in
constant time over the raw bytes, so neither a token's length nor its prefix can be timed out.

This module imports no web framework: `extproc up` reads the environment names below too.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

__all__ = ["FEEDBACK_TOKEN_ENV", "bearer_ok"]

FEEDBACK_TOKEN_ENV = "EXTPROC_FEEDBACK_TOKEN"


def bearer_ok(values: Sequence[str], token: str) -> bool:
    """Whether ``values`` (every ``Authorization`` header of a request) is exactly one
    ``Bearer <token>``; an empty ``token`` authorises nobody.

    HTTP servers hand over undecodable header bytes as surrogate escapes; encoding them back
    with ``surrogateescape`` gives the bytes as sent, which then simply do not match.
    """
    if not token or len(values) != 1:
        return False
    raw = values[0].encode("utf-8", "surrogateescape")
    scheme, _, credential = raw.partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    return hmac.compare_digest(credential, token.encode("utf-8", "surrogateescape"))
