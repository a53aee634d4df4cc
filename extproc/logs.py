"""How every `extproc` process logs: text lines for a terminal, or JSON lines (``--log-format
json``) for a collector that indexes fields, as on Kubernetes.

The sidecar's worker processes are spawned, not forked, so they receive the parent's
:class:`LogSetup` and apply it themselves; otherwise a worker would log in Python's default format.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, and the
    exception's traceback when there is one. Written here rather than taken from a library because
    it is these few fields and nothing else."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


@dataclass(frozen=True)
class LogSetup:
    level: int = logging.INFO
    format: str = "text"

    def apply(self) -> None:
        """Configure the root logger (replacing handlers a library may have added first)."""
        handler = logging.StreamHandler()
        handler.setFormatter(
            JsonFormatter() if self.format == "json" else logging.Formatter(TEXT_FORMAT)
        )
        logging.basicConfig(level=self.level, handlers=[handler], force=True)
