"""The routing follower against a real Redis: registration comes back whole after Redis loses its
data, and a malformed routing value is reported while the last good routing is kept."""

from __future__ import annotations

import json

import pytest
import redis.asyncio as aioredis

from extproc import store
from extproc.config import EXAMPLE_EXPERIMENT, load_experiment
from extproc.contract import keys
from extproc.routing.live import LiveRouting

pytestmark = pytest.mark.timeout(30)

EXP = load_experiment(EXAMPLE_EXPERIMENT)
NAME = EXP.name


async def registered(r: aioredis.Redis) -> bool:
    return bool(await r.exists(keys.definition(NAME)) and await r.sismember(keys.EXPERIMENTS, NAME))


@pytest.mark.parametrize("lost", ["all", "definition", "index"])
async def test_registration_comes_back_when_any_part_of_it_is_lost(
    client: aioredis.Redis, lost: str
) -> None:
    live = LiveRouting(EXP, client)
    await live.refresh()
    assert await registered(client)
    if lost == "all":
        # Redis restarted empty and the evaluator wrote its weights before the sidecar looked.
        await client.flushdb()
        await store.set_weights(client, EXP, {"stable": 100, "canary": 0}, reason="r", actor="a")
    else:
        await client.delete(keys.definition(NAME) if lost == "definition" else keys.EXPERIMENTS)
    await live.refresh()
    assert await registered(client)
    if lost == "all":  # re-registering never overwrites the routing that is there
        assert live.current.weights == {"stable": 100.0, "canary": 0.0}
    assert await store.get_definition(client, NAME) == EXP.to_json_dict()


async def test_a_malformed_routing_value_is_reported_and_a_valid_change_applied(
    client: aioredis.Redis,
) -> None:
    live = LiveRouting(EXP, client)
    await store.set_weights(client, EXP, {"stable": 50, "canary": 50}, reason="r", actor="a")
    await live.refresh()
    good = live.current
    assert good.weights == {"stable": 50.0, "canary": 50.0}
    for bad in ("{not json", json.dumps({"version": 9, "weights": ["stable"]}), "[]"):
        await client.set(keys.routing(NAME), bad)
        await live.refresh()  # never raises
        assert live.current is good
        assert live.routing_error is not None
        assert "malformed routing value" in live.routing_error
    # A rollback written over the bad value is applied, though its version starts again at 1.
    state = await store.set_weights(
        client, EXP, {"stable": 100, "canary": 0}, reason="rollback", actor="a"
    )
    assert state.version == 1 == good.version
    await live.refresh()
    assert live.current.weights == {"stable": 100.0, "canary": 0.0}
    assert live.routing_error is None


async def test_invalid_weights_are_reported_once_per_problem(
    client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    live = LiveRouting(EXP, client)
    await live.refresh()
    doc = {"version": 7, "weights": {"stable": 10, "gpt-9": 90}}
    await client.set(keys.routing(NAME), json.dumps(doc))
    for _ in range(3):
        await live.refresh()
    assert live.routing_error is not None
    assert "gpt-9" in live.routing_error
    assert live.current.version == 1
    assert len([r for r in caplog.records if "keeping routing version" in r.message]) == 1
