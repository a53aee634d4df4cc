"""`extproc dashboard`: a browser view of the experiments, read from Redis only.

The server (``server.py``) is a JSON API over the same library functions the CLI uses
(``extproc.ops.status``, ``extproc.evaluator.rollout``) plus a static page that polls it. Operator
actions go through the commands stream like `extproc experiment pause|resume|promote|rollback`,
so the evaluator stays the one writer of rollout decisions.

This module holds only what `extproc up` needs without importing aiohttp.
"""

from __future__ import annotations

TOKEN_ENV = "EXTPROC_DASHBOARD_TOKEN"
