"""The whole data path on a real three-master Redis Cluster (``redis+cluster://`` URL).

What a cluster changes: keys live on different nodes, a transaction or script may only touch keys of
one hash slot, pub/sub is per node, and a client must follow the slot map. The experiment's keys
share the hash tag ``{<experiment>}`` (extproc/contract/keys.py), so the telemetry writer's batch
script and the routing script run in one slot; the untagged keys (``extproc:experiments``,
heartbeats) are written on their own. This test runs Envoy, the sidecar, the evaluator and the CLI
against three redis-server processes in cluster mode, with slots assigned through CLUSTER ADDSLOTS
and MEET.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import httpx
import pytest
import redis
from redis.crc import key_slot

from extproc.config import load_experiment
from extproc.contract import keys
from extproc.dev import stack
from tests.conftest import LiveStack, start_stack, wait_for
from tests.integration.sidecar_probe import (
    apply_and_measure,
    events_by_request,
    expected_variants,
    report,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

NAME = "chat-upgrade"
SLOTS = 16_384
BUS_OFFSET = 10_000  # redis-server 6.2 puts a node's cluster bus on its port + 10000


def _node_port(taken: set[int]) -> int:
    for _ in range(200):
        port = stack.free_port()
        bus = port + BUS_OFFSET
        if port not in taken and bus < 65_536 and not stack.port_in_use(bus):
            return port
    raise AssertionError("no free port whose cluster bus port is free too")


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Three masters, a third of the slots each; yields the URL that selects cluster mode."""
    folder = tmp_path_factory.mktemp("cluster")
    st = stack.Stack(folder)
    ports: list[int] = []
    for _ in range(3):
        ports.append(_node_port(set(ports)))
    try:
        for p in ports:
            st.spawn(
                f"redis-{p}",
                [
                    *(stack.redis_binary(), "--port", str(p), "--bind", "127.0.0.1"),
                    *("--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{p}.conf"),
                    *("--dir", str(folder), "--save", "", "--appendonly", "no"),
                ],
            )
        for p in ports:
            wait_for(stack.redis_ok(f"redis://127.0.0.1:{p}/0"), f"cluster node {p}")
        nodes = [redis.Redis(host="127.0.0.1", port=p) for p in ports]
        for i, node in enumerate(nodes):
            node.execute_command("CLUSTER ADDSLOTS", *range(i * SLOTS // 3, (i + 1) * SLOTS // 3))
        for node in nodes[1:]:
            node.execute_command("CLUSTER MEET", "127.0.0.1", ports[0])

        def formed() -> bool:
            infos = [n.execute_command("CLUSTER INFO") for n in nodes]
            return all(
                i["cluster_state"] == "ok" and int(i["cluster_known_nodes"]) == 3 for i in infos
            )

        wait_for(formed, "cluster_state:ok on every node")
        for n in nodes:
            n.close()
        yield f"redis+cluster://127.0.0.1:{ports[0]}/0"
    finally:
        st.stop_all()


@pytest.fixture(scope="module")
def cluster_stack(
    redis_cluster: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveStack]:
    s = start_stack(
        tmp_path_factory.mktemp("stack"),
        redis_url=redis_cluster,
        mock_args={"stable": ["--fast"], "canary": ["--fast"]},
    )
    try:
        yield s
    finally:
        stack.down(s.state_dir)


def test_one_experiment_lives_in_one_slot_and_the_cluster_spreads_slots(
    cluster_stack: LiveStack,
) -> None:
    tagged = [keys.routing(NAME), keys.events(NAME), keys.counts(NAME), keys.changes(NAME)]
    assert len({key_slot(k.encode()) for k in tagged}) == 1
    r = cluster_stack.redis()
    assert isinstance(r, redis.RedisCluster)
    assert len(r.get_primaries()) == 3


def test_whole_data_path_on_a_redis_cluster(cluster_stack: LiveStack, http: httpx.Client) -> None:
    s = cluster_stack
    exp = load_experiment(s.experiment_path)
    half = {"stable": 50.0, "canary": 50.0}
    s.set_weights(**half)
    convs = [f"cluster-{uuid.uuid4()}" for _ in range(60)]
    expected = expected_variants(exp, half, convs)
    conversation_of = {}
    for c in convs:
        r = s.chat(http, {"x-conversation-id": c})
        assert r.status_code == 200
        assert r.headers["x-llm-variant"] == expected[c]
        conversation_of[r.headers["x-request-id"]] = c
    by_id = wait_for(
        lambda: events_by_request(s, NAME, set(conversation_of)), "the events in the cluster"
    )
    assert all(ev.variant == expected[conversation_of[rid]] for rid, ev in by_id.items())

    doc = s.status()
    assert doc["experiment"] == NAME
    assert doc["routing"]["weights"] == half
    assert sum(v["requests"] for v in doc["variants"].values()) >= len(convs)
    # The figures come from the rollups, added up by a script in the experiment's one slot.
    assert sum(v["window_requests"] for v in doc["variants"].values()) >= len(convs)
    assert len(doc["sidecars"]) == 1
    wait_for(
        lambda: any(e["active"] and int(e["ticks"]) > 0 for e in s.status()["evaluators"]),
        "the evaluator to hold the lease and tick",
    )

    out = s.cli("experiment", "pause", NAME, "--reason", "cluster test")
    assert out.returncode == 0, out.stderr

    def paused() -> bool:
        log = s.cli("log", NAME, "--json")
        assert log.returncode == 0, log.stderr
        return any(rec["action"] == "pause" for rec in json.loads(log.stdout))

    wait_for(paused, "the evaluator to apply the pause (commands and audit streams)")

    m = apply_and_measure(s, exp, half, {"stable": 100.0, "canary": 0.0})
    report("rollback on Redis Cluster", m)
    for c in convs[:20]:
        assert s.chat(http, {"x-conversation-id": c}).headers["x-llm-variant"] == "stable"
