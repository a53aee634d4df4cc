"""The lifecycle around the stages: the warm-up gate and the drain, each with its clock injected,
against in-process HTTP servers that speak Envoy's admin text formats (as a live Envoy answers
them: tests/integration/test_lifecycle_live.py reads the real one) and a listener that forwards
forced requests; the transitions in machine.py; the file's `lifecycle` section; the status lines.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from extproc.config import ConfigError, Drain, Hooks, parse_experiment
from extproc.evaluator import drain, envoy_admin, hooks, machine, warmup
from extproc.ops import lifecycle

pytestmark = pytest.mark.timeout(30)

EXPERIMENT: dict[str, Any] = {
    "name": "exp",
    "salt": "s",
    "stable": "stable",
    "variants": {
        "stable": {"cluster": "model_stable", "weight": 100, "model": "m1"},
        "canary": {"cluster": "model_canary", "weight": 0, "model": "m2"},
    },
    "rollout": {"stages": [10, 50, 100]},
}


def experiment(**lifecycle_section: Any) -> Any:
    return parse_experiment({**EXPERIMENT, "lifecycle": lifecycle_section}, "/tmp/exp.yaml")


class Clock:
    """The injected clock and sleep: a sleep moves the clock instead of waiting."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@dataclass
class FakeEnvoy:
    """Envoy's admin (``/stats?filter=REGEX``, ``/clusters``) and its listener, scripted.

    ``active`` lists each look's open requests per cluster (the last one repeats); ``health``
    each look's health flags of the canary's host; the listener answers ``statuses`` in turn,
    then 200, and records each request's headers.
    """

    active: list[dict[str, int]] = field(default_factory=lambda: [{}])
    health: list[str] = field(default_factory=lambda: ["healthy"])
    statuses: list[int] = field(default_factory=list)
    received: list[dict[str, str]] = field(default_factory=list)
    looks: int = 0
    url: str = ""

    async def stats(self, request: web.Request) -> web.Response:
        counts = self.active[min(self.looks, len(self.active) - 1)]
        self.looks += 1
        every = {"model_stable": 0, "model_canary": 0, "extproc_sidecar": 1, **counts}
        lines = [f"cluster.{c}.upstream_rq_active: {n}" for c, n in sorted(every.items())]
        lines += [f"cluster.{c}.upstream_rq_total: 99" for c in sorted(every)]
        pattern = re.compile(request.query.get("filter", ""))
        text = "\n".join(line for line in lines if pattern.search(line.split(": ")[0]))
        return web.Response(text=text + "\n")

    async def clusters(self, request: web.Request) -> web.Response:
        flags = self.health.pop(0) if len(self.health) > 1 else self.health[0]
        text = (
            "model_canary::default_priority::max_connections::1024\n"
            "model_canary::127.0.0.1:8001::cx_active::0\n"
            f"model_canary::127.0.0.1:8001::health_flags::{flags}\n"
            "model_stable::127.0.0.1:8002::health_flags::healthy\n"
        )
        return web.Response(text=text)

    async def chat(self, request: web.Request) -> web.Response:
        self.received.append(dict(request.headers))
        await request.json()
        status = self.statuses.pop(0) if self.statuses else 200
        return web.json_response({"choices": [{"message": {"content": "hi"}}]}, status=status)


@pytest.fixture
async def envoy() -> AsyncIterator[FakeEnvoy]:
    fake = FakeEnvoy()
    app = web.Application()
    app.router.add_get("/stats", fake.stats)
    app.router.add_get("/clusters", fake.clusters)
    app.router.add_post("/v1/chat/completions", fake.chat)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()  # a free port, picked by the kernel
    fake.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield fake
    await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


# --- Envoy's admin formats --------------------------------------------------------------------


def test_the_stats_filter_selects_exactly_the_active_gauges() -> None:
    pattern = re.compile(envoy_admin.stats_filter(["model_canary", "a.b"]))
    assert pattern.search("cluster.model_canary.upstream_rq_active")
    assert pattern.search("cluster.a.b.upstream_rq_active")
    assert not pattern.search("cluster.aXb.upstream_rq_active")  # the dot is escaped
    assert not pattern.search("cluster.model_canary.upstream_rq_active_total")


def test_parse_reads_envoys_text_formats() -> None:
    stats = "cluster.model_canary.upstream_rq_active: 3\ncluster.other.upstream_rq_active: 9\n"
    assert envoy_admin.parse_active(stats, ["model_canary", "gone"]) == {"model_canary": 3}
    with pytest.raises(envoy_admin.AdminError):
        envoy_admin.parse_active("cluster.x.upstream_rq_active: many", ["x"])
    clusters = (
        "model_canary::127.0.0.1:1::health_flags::healthy\n"
        "model_canary::127.0.0.1:2::health_flags::/failed_active_hc\n"
        "model_canary::127.0.0.1:1::cx_active::2\n"
    )
    assert envoy_admin.parse_health(clusters, ["model_canary", "none"]) == {
        "model_canary": ["healthy", "/failed_active_hc"],
        "none": [],
    }


async def test_a_cluster_envoy_does_not_know_is_an_error(
    envoy: FakeEnvoy, session: aiohttp.ClientSession
) -> None:
    with pytest.raises(envoy_admin.AdminError, match="no upstream_rq_active"):
        await envoy_admin.active_requests(session, envoy.url, ["model_canary", "missing"])


# --- drain --------------------------------------------------------------------------------------


async def test_drained_when_no_envoy_holds_a_request(
    envoy: FakeEnvoy, session: aiohttp.ClientSession
) -> None:
    envoy.active = [{"model_canary": 3}, {"model_canary": 1}, {"model_canary": 0}]
    clock = Clock()
    looks: list[int | None] = []

    async def look(active: int | None) -> None:
        looks.append(active)

    report = await drain.watch(
        session, [envoy.url], ["model_canary"], Drain(poll_s=0.5), clock, clock.sleep, look
    )
    assert report == drain.DrainReport(True, 1.5, 3, first=3, active=0)
    assert looks == [3, 1, 0]
    assert clock.slept == [0.5, 0.5, 0.5]  # the first look one poll after the decision
    assert report.reason(["canary"]) == (
        "canary drained after 1.5 s (3 requests open at the first look)"
    )


async def test_every_envoy_counts(envoy: FakeEnvoy, session: aiohttp.ClientSession) -> None:
    """Two admins (here the same fake twice): the open requests are summed over both."""
    envoy.active = [{"model_canary": 2}, {"model_canary": 0}, {"model_canary": 0}]
    clock = Clock()
    report = await drain.watch(
        session, [envoy.url, envoy.url], ["model_canary"], Drain(poll_s=1), clock, clock.sleep
    )
    assert (report.drained, report.first, report.polls) == (True, 2, 2)


async def test_not_drained_in_time_is_reported_with_what_is_open(
    envoy: FakeEnvoy, session: aiohttp.ClientSession
) -> None:
    envoy.active = [{"model_canary": 2}]
    clock = Clock()
    report = await drain.watch(
        session, [envoy.url], ["model_canary"], Drain(poll_s=2, timeout_s=5), clock, clock.sleep
    )
    assert report == drain.DrainReport(False, 6.0, 3, first=2, active=2)
    assert report.reason(["canary"]) == "canary not drained after 6.0 s: 2 requests open"


async def test_an_unreachable_envoy_leaves_the_drain_unconfirmed(
    session: aiohttp.ClientSession,
) -> None:
    clock = Clock()
    report = await drain.watch(
        session, ["http://127.0.0.1:1"], ["c"], Drain(poll_s=1, timeout_s=2), clock, clock.sleep
    )
    assert (report.drained, report.first, report.active) == (False, None, None)
    assert report.error.startswith("http://127.0.0.1:1/stats: ClientConnectorError")
    assert "unknown requests open" in report.reason(["canary"])


def test_stables_lane_clusters_drain_with_it_on_the_native_plane() -> None:
    three = {
        **EXPERIMENT,
        "dataplane": "native",
        "variants": {
            "stable": {"cluster": "s", "weight": 100},
            "a": {"cluster": "ca", "weight": 0},
            "b": {"cluster": "cb", "weight": 0},
        },
        "rollout": {"stages": [10, 50]},
    }
    exp = parse_experiment(three)
    assert drain.clusters_of(exp, ["stable"]) == ["s", "s_lane_a"]
    assert drain.clusters_of(exp, ["a", "b"]) == ["ca", "cb"]


# --- warm-up ------------------------------------------------------------------------------------


def runner(
    envoy: FakeEnvoy, session: aiohttp.ClientSession, clock: Clock, **warm: Any
) -> warmup.WarmupRunner:
    exp = experiment(warmup=warm)
    reach = warmup.Reach(listener=envoy.url, admins=(envoy.url,))
    return warmup.WarmupRunner(
        exp, ["canary"], reach, session, attempt=2, clock=clock, sleep=clock.sleep
    )


async def test_warm_up_sends_forced_marked_requests_until_enough_are_answered(
    envoy: FakeEnvoy, session: aiohttp.ClientSession
) -> None:
    envoy.statuses = [504, 503, 504]  # a cold model: its first answers time out
    clock = Clock()
    report = await runner(envoy, session, clock, requests=5, concurrency=1).run()
    assert report.ok
    assert (report.sent, report.answered) == ({"canary": 8}, {"canary": 5})
    assert clock.slept == [warmup.RETRY_S] * 3  # a pause after each unanswered request
    assert all(h["x-experiment"] == "canary" and h["x-llm-warmup"] == "2" for h in envoy.received)
    prompts = {p.id for p in warmup.DEFAULT_PROMPTS}
    assert len(prompts) == len(warmup.DEFAULT_PROMPTS) >= 5
    assert report.reason() == ("warm-up finished in 0.8 s: 5 requests to canary answered (8 sent)")


async def test_warm_up_that_is_not_answered_in_time_fails(
    envoy: FakeEnvoy, session: aiohttp.ClientSession
) -> None:
    envoy.statuses = [503] * 1000
    clock = Clock()
    report = await runner(envoy, session, clock, requests=3, concurrency=1, timeout_s=2).run()
    assert not report.ok
    assert report.answered == {"canary": 0}
    assert report.seconds == pytest.approx(2.0)
    assert report.reason().startswith("warm-up failed after 2.0 s: fewer than 3 answers from")


async def test_warm_up_waits_for_healthy_hosts_first(
    envoy: FakeEnvoy, session: aiohttp.ClientSession
) -> None:
    envoy.health = ["/failed_active_hc", "/failed_active_hc", "healthy"]
    clock = Clock()
    report = await runner(envoy, session, clock, requests=0, wait_healthy=True).run()
    assert report.ok
    assert report.healthy_after == pytest.approx(2 * warmup.HEALTH_POLL_S)
    assert envoy.received == []
    envoy.health = ["/failed_active_hc"]
    report = await runner(envoy, session, Clock(), requests=2, wait_healthy=True, timeout_s=3).run()
    assert (report.ok, report.sent) == (False, {"canary": 0})
    assert "not healthy" in report.error


def test_prepare_lists_every_missing_address_and_a_bad_prompt_file(tmp_path: Any) -> None:
    bad = tmp_path / "prompts.yaml"
    bad.write_text("prompts: [{id: x}]\n")
    doc = {
        **EXPERIMENT,
        "forced_routing": {"secret_env": "EXTPROC_TEST_UNSET_SECRET"},
        "lifecycle": {"warmup": {"requests": 3, "wait_healthy": True, "prompts": str(bad)}},
    }
    with pytest.raises(ConfigError) as err:
        warmup.prepare(parse_experiment(doc))
    problems = err.value.problems
    assert problems[:3] == [
        "lifecycle.listener: warm-up requests need Envoy's listener (or --listener)",
        "lifecycle.envoy_admin: wait_healthy needs Envoy's admin address (or --envoy-admin)",
        "forced_routing.secret_env: $EXTPROC_TEST_UNSET_SECRET is not set (warm-up forces)",
    ]
    assert problems[3].startswith(f"lifecycle.warmup.prompts ({bad}): prompts.0.prompt: ")
    good = tmp_path / "good.yaml"
    good.write_text("prompts: [{id: a, prompt: hello}]\n")
    exp = parse_experiment(
        {**EXPERIMENT, "lifecycle": {"warmup": {"prompts": "good.yaml"}}},
        str(tmp_path / "exp.yaml"),
    )
    reach = warmup.prepare(exp, "http://envoy:10000", ["http://envoy:9901"])
    assert (reach.listener, reach.admins) == ("http://envoy:10000", ("http://envoy:9901",))
    assert [p.prompt for p in reach.prompts] == ["hello"]


# --- the transitions --------------------------------------------------------------------------


def test_a_warm_up_holds_stage_one_until_it_is_done() -> None:
    spec = experiment(warmup={"requests": 4}).spec
    t = machine.begin(spec, 100.0)
    assert (t.action, t.state.status) == ("start", "warming_up")
    assert t.weights == {"stable": 100.0, "canary": 0.0}
    assert t.reasons[1] == "warm-up started: 4 answered requests to each of canary, within 300 s"
    done = machine.warmed(spec, t.state, True, "warm-up finished", {"ok": True}, 130.0)
    assert (done.action, done.state.status, done.state.stage) == ("warmed_up", "running", 0)
    assert done.state.stage_started == 130.0  # the stage clock starts after the warm-up
    assert done.weights == {"stable": 90.0, "canary": 10.0}
    assert done.restart_window
    assert done.state.warmup == {"ok": True}
    failed = machine.warmed(spec, t.state, False, "warm-up failed", {"ok": False}, 130.0)
    assert (failed.action, failed.state.status, failed.reasons) == (
        "rollback",
        "rolled_back",
        ["warm-up failed"],
    )
    assert machine.begin(experiment().spec, 1.0).state.status == "running"  # no warm-up


def test_with_phases_the_warm_up_comes_before_the_first_phase() -> None:
    """Stage 1 of the first phase gets its weights when the warm-up is done: here a canary
    phase of 20% before an A/B phase (the experiment's own first stage would be 10%)."""
    doc = {
        **EXPERIMENT,
        "lifecycle": {"warmup": {"requests": 4}},
        "phases": [
            {"name": "ramp", "strategy": "canary", "rollout": {"stages": [20, 50]}},
            {"name": "compare", "strategy": "ab"},
        ],
    }
    spec = parse_experiment(doc).spec
    t = machine.begin(spec, 100.0)
    assert (t.state.status, t.state.phase, t.state.strategy) == ("warming_up", 0, "canary")
    done = machine.warmed(spec, t.state, True, "warm-up finished", {"ok": True}, 130.0)
    assert done.weights == {"stable": 80.0, "canary": 20.0}


def test_an_operator_can_stop_a_warm_up_and_a_restart_warms_up_again() -> None:
    spec = experiment(warmup={"requests": 4}).spec
    warming = machine.begin(spec, 100.0).state
    aborted = machine.command(spec, warming, "abort", "ops", "", 101.0)
    assert aborted.state.status == "aborted"
    late = machine.warmed(spec, aborted.state, True, "", {}, 102.0)
    assert late.action == ""
    assert late.state.status == "aborted"
    again = machine.command(spec, aborted.state, "restart", "ops", "", 103.0)
    assert (again.state.status, again.state.attempt) == ("warming_up", 2)
    assert again.weights == {"stable": 100.0, "canary": 0.0}
    assert again.reasons[-1].startswith("warm-up started: ")
    rolled = machine.command(spec, again.state, "rollback", "ops", "", 104.0)
    assert rolled.state.status == "rolled_back"
    ignored = machine.command(spec, again.state, "promote", "ops", "", 104.0)
    assert ignored.reasons == ["ignored 'promote' by ops: rollout is warming_up"]


# --- hooks, the file, the status --------------------------------------------------------------


def test_on_drained_is_called_for_a_drain_with_its_report() -> None:
    hooked = Hooks(on_drained="http://x/drained")
    assert hooks.hook_url(hooked, "drained") == ("on_drained", "http://x/drained")
    assert hooks.hook_url(hooked, "drain_timeout") == ("on_drained", "http://x/drained")
    spec = experiment().spec
    report = {"status": "drained", "variants": ["canary"], "seconds": 1.5}
    b = hooks.body(spec, "on_drained", "drained", {"stage": 0, "drain": report})
    assert b["drain"] == report
    assert "drain" not in hooks.body(spec, "on_rollback", "rollback", {"stage": 0})


def test_the_lifecycle_section_is_checked_with_its_paths() -> None:
    doc = {
        **EXPERIMENT,
        "forced_routing": {"enabled": False},
        "hooks": {"on_drained": "nowhere"},
        "lifecycle": {
            "listener": "ftp://envoy",
            "envoy_admin": ["http://envoy:9901", "envoy:9901"],
            "warmup": {"requests": 0, "timeout_s": 0, "concurrency": 100},
            "drain": {"poll_s": -1},
        },
    }
    with pytest.raises(ConfigError) as err:
        parse_experiment(doc)
    problems = err.value.problems
    for expected in (
        "lifecycle.listener: 'ftp://envoy' is not an http(s) URL",
        "lifecycle.envoy_admin.1: 'envoy:9901' is not an http(s) URL",
        "lifecycle.warmup: nothing to do: set requests above 0 or wait_healthy",
        "hooks.on_drained: 'nowhere' is not an http(s) URL",
    ):
        assert expected in problems
    for path in ("lifecycle.warmup.timeout_s", "lifecycle.warmup.concurrency", "lifecycle.drain"):
        assert any(p.startswith(path) for p in problems), path
    doc["lifecycle"] = {"warmup": {"requests": 5}}
    with pytest.raises(ConfigError) as err:
        parse_experiment(doc)
    assert err.value.problems == [
        "hooks.on_drained: 'nowhere' is not an http(s) URL",
        "lifecycle.warmup.requests: warm-up requests are forced: needs forced_routing.enabled",
    ]
    doc = {**EXPERIMENT, "forced_routing": {"allow": ["stable"]}, "lifecycle": doc["lifecycle"]}
    with pytest.raises(ConfigError) as err:
        parse_experiment(doc)
    assert err.value.problems == [
        "lifecycle.warmup.requests: forced_routing.allow refuses candidate(s) ['canary'], "
        "which warm-up forces"
    ]


def test_status_lines_show_the_warm_up_and_the_drain() -> None:
    assert lifecycle.lines({"status": "running"}) == []
    assert lifecycle.lines({"status": "warming_up"}) == [
        "warm-up    running: stage 1 waits for it (all traffic on stable)"
    ]
    done = {"ok": True, "seconds": 4.24, "answered": {"canary": 20}}
    drained = {"status": "drained", "variants": ["canary"], "seconds": 1.52}
    assert lifecycle.lines({"status": "rolled_back", "warmup": done, "drain": drained}) == [
        "warm-up    done in 4.2 s (answered: canary 20)",
        "drain      canary drained after 1.5 s",
    ]
    unknown = {"status": "unknown", "variants": ["canary"], "error": "no Envoy admin address"}
    assert lifecycle.lines({"status": "rolled_back", "drain": unknown}) == [
        "drain      canary: unknown (no Envoy admin address)"
    ]
    timeout = {"status": "timeout", "variants": ["stable"], "seconds": 600.4, "active": 3}
    assert (
        lifecycle.drain_line(timeout)
        == "drain      stable not drained after 600.4 s (3 requests open)"
    )
    draining = {"status": "draining", "variants": ["canary"], "after": "rollback", "active": 2}
    assert lifecycle.drain_line(draining) == (
        "drain      canary draining since the rollback: 2 requests open"
    )
