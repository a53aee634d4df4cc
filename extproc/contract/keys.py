"""Every Redis key and channel the project uses, in one place.

Keys of one experiment share the hash tag ``{<experiment>}`` so that they live in one Redis Cluster
slot: a transaction that appends events and bumps counters, or one that changes weights and records
the change, then works on a cluster as on a single server.

Layout (``E`` is the experiment name):

==============================  ======  ==================================================
key                             type    content
==============================  ======  ==================================================
``extproc:experiments``         set     names of the live experiments (what sidecars serve
                                        and evaluators judge)
``extproc:experiments:ended``   zset    experiments ended with `experiment end`, by when:
                                        their data is kept for reading
``extproc:catalog``             pubsub  a message when an experiment is created, replaced or
                                        ended (fleet sidecars follow at once)
``extproc:{E}:definition``      string  the experiment file as JSON
``extproc:{E}:routing``         string  live routing (JSON: version, weights, reason)
``extproc:{E}:changes``         pubsub  a message per routing change (the new version)
``extproc:{E}:events``          stream  an event per request (field ``e``: protobuf)
``extproc:{E}:counts``          hash    total requests per variant (exact, never trimmed)
``extproc:{E}:rollout``         string  the evaluator's rollout state (JSON: stage, status)
``extproc:{E}:audit``           stream  every decision and operator action (field ``j``: JSON)
``extproc:{E}:commands``        stream  operator intents (pause, promote, ...) for the evaluator
``extproc:{E}:lease``           string  the active evaluator's id, with a TTL
``extproc:{E}:snapshot``        hash    the active evaluator's stage window and the stream ids it
                                        covers, for a standby's takeover (``meta``: JSON, ``p:*``:
                                        packed columns), with a TTL
``extproc:{E}:pairs``           zset    request ids of captured pairs, scored by time
``extproc:{E}:pair:<rid>``      hash    ``primary``, ``shadow``, ``judge`` or ``judge_error`` (JSON)
``extproc:{E}:signals``         stream  judge verdicts, feedback, watchdog probes (``j``: JSON)
``extproc:{E}:evaluation``      string  the evaluator's latest look (JSON: figures, checks)
``extproc:{E}:batch:<id>``      string  id of an applied telemetry batch, with a TTL
``extproc:{E}:rollup:<w>:<t>``  hash    per-variant aggregates of the requests that started
                                        in [t, t + w) seconds (w: 10, kept 6 h; 300, kept
                                        ``telemetry.rollup_retention_days``)
``extproc:{E}:open:<k>:<v>``    zset    requests of kind k and variant v noticed open, by
                                        start (ms)
``extproc:sidecar:<instance>``  hash    a sidecar replica's counters, with a TTL (liveness)
``extproc:sidecars``            zset    sidecar instances by their last heartbeat (the list
                                        readers take, instead of scanning every key)
``extproc:evaluator:<id>``      hash    an evaluator's health, with a TTL
``extproc:evaluators``          zset    evaluator ids by their last heartbeat
==============================  ======  ==================================================
"""

from __future__ import annotations

PREFIX = "extproc"
EXPERIMENTS = f"{PREFIX}:experiments"
ENDED = f"{PREFIX}:experiments:ended"
CATALOG = f"{PREFIX}:catalog"
SIDECARS = f"{PREFIX}:sidecars"
EVALUATORS = f"{PREFIX}:evaluators"
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


def rollout(experiment: str) -> str:
    return _tagged(experiment, "rollout")


def audit(experiment: str) -> str:
    return _tagged(experiment, "audit")


def commands(experiment: str) -> str:
    return _tagged(experiment, "commands")


def lease(experiment: str) -> str:
    return _tagged(experiment, "lease")


def snapshot(experiment: str) -> str:
    """The active evaluator's latest stage-window snapshot (``evaluator/snapshot.py``)."""
    return _tagged(experiment, "snapshot")


def evaluator(instance: str) -> str:
    return f"{PREFIX}:evaluator:{instance}"


def pairs(experiment: str) -> str:
    return _tagged(experiment, "pairs")


def pair(experiment: str, request_id: str) -> str:
    return _tagged(experiment, f"pair:{request_id}")


def signals(experiment: str) -> str:
    return _tagged(experiment, "signals")


def evaluation(experiment: str) -> str:
    return _tagged(experiment, "evaluation")


def batch(experiment: str, batch_id: str) -> str:
    return _tagged(experiment, f"batch:{batch_id}")


def rollup(experiment: str, width_s: int, start_s: int) -> str:
    """One time bucket's aggregates (``telemetry/rollup.py``): ``width_s`` from ``start_s``."""
    return _tagged(experiment, f"rollup:{width_s}:{start_s}")


def open_requests(experiment: str, traffic: str, variant: str) -> str:
    """Requests of one variant and kind of traffic reported still open (in-flight notices whose
    final event has not come yet), scored by start time (``telemetry/rollup.py``)."""
    return _tagged(experiment, f"open:{traffic}:{variant}")
