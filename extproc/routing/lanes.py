"""The native data plane's weights: the bucket lanes of :func:`contract.assignment.lanes` as
Envoy's weighted clusters, in basis points.

Envoy takes the request's hash modulo the total and walks the list, so the total stays 10,000 and
each candidate comes first in its lane: raising a candidate only takes hashes from the filler
behind it (monotone), and one candidate's ramp never moves another's range. The last candidate's
filler is the stable cluster itself, which also takes the remainder. The config generator writes the
initial list; the sidecar's RTDS layer moves it as the rollout walks.
"""

from __future__ import annotations

from extproc.config import Experiment
from extproc.contract.assignment import BUCKETS, lanes
from extproc.contract.envoy import RUNTIME_PREFIX, lane_cluster


def cluster_weights(experiment: Experiment, weights: dict[str, float]) -> list[tuple[str, int]]:
    """(cluster, basis points) in hash order, as the sidecar's bucket table lays buckets."""
    spec = experiment.spec
    stable_cluster = spec.variants[experiment.stable].cluster
    layout = lanes(experiment.candidates, weights)
    out: list[tuple[str, int]] = []
    for n, (name, _start, held) in enumerate(layout):
        out.append((spec.variants[name].cluster, held))
        if n < len(layout) - 1:
            lane = BUCKETS // len(layout)
            out.append((lane_cluster(stable_cluster, name), lane - held))
    out.append((stable_cluster, BUCKETS - sum(w for _, w in out)))
    return out


def runtime_weights(experiment: Experiment, weights: dict[str, float]) -> dict[str, int]:
    """The RTDS layer for a routing: runtime key -> basis points."""
    return {f"{RUNTIME_PREFIX}.{c}": w for c, w in cluster_weights(experiment, weights)}
