"""Every Redis key and channel the project uses, in one place.

Keys of one experiment share the hash tag ``{<experiment>}`` so that they live in one Redis Cluster
slot: a transaction that appends events and bumps counters, or one that changes weights and records
the change, then works on a cluster as on a single server.

Layout (``E`` is the experiment name):

==============================  ======  ==================================================
key                             type    content
==============================  ======  ==================================================
``extproc:experiments``         set     names of the experiments known to this Redis
``extproc:{E}:definition``      string  the experiment file as JSON
``extproc:{E}:routing``         string  live routing (JSON: version, weights, reason)
``extproc:{E}:changes``         pubsub  a message per routing change (the new version)
``extproc:{E}:events``          stream  an event per request (field ``e``: protobuf)
``extproc:{E}:counts``          hash    total requests per variant (exact, never trimmed)
``extproc:sidecar:<instance>``  hash    a sidecar replica's counters, with a TTL (liveness)
==============================  ======  ==================================================
"""

from __future__ import annotations

PREFIX = "extproc"
EXPERIMENTS = f"{PREFIX}:experiments"
SIDECAR_PATTERN = f"{PREFIX}:sidecar:*"
EVENT_FIELD = b"e"


def _tagged(experiment: str, suffix: str) -> str:
    return f"{PREFIX}:{{{experiment}}}:{suffix}"


def definition(experiment: str) -> str:
    return _tagged(experiment, "definition")


def routing(experiment: str) -> str:
    return _tagged(experiment, "routing")


def changes(experiment: str) -> str:
    return _tagged(experiment, "changes")


def events(experiment: str) -> str:
    return _tagged(experiment, "events")


def counts(experiment: str) -> str:
    return _tagged(experiment, "counts")


def sidecar(instance: str) -> str:
    return f"{PREFIX}:sidecar:{instance}"
