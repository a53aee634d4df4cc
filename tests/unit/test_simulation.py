"""The simulation that judges the evaluator: its generator, its interval, its closed loop."""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from extproc.config import EXAMPLE_EXPERIMENT, load_experiment
from extproc.evaluator.replay import replay_source
from extproc.telemetry.export import RecordedEvent
from extproc.telemetry.v1.event_pb2 import ErrorClass

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import canary_traffic as ct
import simulate_evaluator as sim

T0 = 1_767_225_600_000


def traffic(scenario: ct.Scenario, seed: int = 1, notice_ms: int = 5000) -> ct.Traffic:
    return ct.Traffic(
        scenario,
        seed,
        start_ms=T0,
        experiment="chat-upgrade",
        stable="stable",
        candidate="canary",
        notice_ms=notice_ms,
        timeout_ms=300_000,
    )


def drain(t: ct.Traffic, seconds: int, weights: Mapping[str, float]) -> list[RecordedEvent]:
    """Every event of ``seconds`` of traffic at a fixed split, read every 5 s."""
    out: list[RecordedEvent] = []
    for k in range(1, seconds // 5 + 1):
        out += t.read(T0 + 5000 * k, weights)
    return out


def finals(events: Iterable[RecordedEvent]) -> list[RecordedEvent]:
    return [e for e in events if not e.event.in_flight]


@pytest.mark.parametrize(
    ("shift", "level", "below"),
    [(ct.p99(1.3), 99, 50), (ct.p99(1.6), 99, 90)],
)
def test_latency_shift_moves_the_tail_quantile_by_its_factor_only(
    shift: ct.Shift, level: float, below: float
) -> None:
    n = 400_000
    base = ct.Arm().latency(np.random.default_rng(1), n)
    moved = replace(ct.Arm(), latency_shift=shift).latency(np.random.default_rng(2), n)
    ratio = np.percentile(moved, level) / np.percentile(base, level)
    assert ratio == pytest.approx(shift.factor, rel=0.04)
    low = np.percentile(moved, below) / np.percentile(base, below)
    assert low == pytest.approx(1.0, abs=0.015)


def test_ttft_shift_moves_p95_by_its_factor_and_leaves_the_median() -> None:
    n = 400_000
    base = ct.Arm().ttft(np.random.default_rng(3), n)
    moved = replace(ct.Arm(), ttft_shift=ct.p95(1.4)).ttft(np.random.default_rng(4), n)
    assert np.percentile(moved, 95) / np.percentile(base, 95) == pytest.approx(1.4, rel=0.03)
    assert np.percentile(moved, 50) / np.percentile(base, 50) == pytest.approx(1.0, abs=0.015)


def test_ttft_shift_reaches_the_events_whole() -> None:
    """The events carry the candidate's TTFT as drawn: no bound by its latency dilutes it."""
    sc = ct.Scenario(candidate=replace(ct.Arm(), ttft_shift=ct.p95(1.4)))
    events = finals(drain(traffic(sc), 3000, {"canary": 50}))
    ttft = {
        v: [e.event.first_token_ms for e in events if e.event.variant == v and not e.event.error]
        for v in ("stable", "canary")
    }
    assert np.percentile(ttft["canary"], 95) / np.percentile(ttft["stable"], 95) == pytest.approx(
        1.4, rel=0.06
    )
    assert all(e.event.duration_ms >= e.event.first_token_ms for e in events if not e.event.error)


def test_latency_cdf_is_the_mixture_the_draws_come_from() -> None:
    arm = ct.Arm(tail_share=0.05, tail_alpha=1.2)
    x = arm.latency(np.random.default_rng(5), 200_000)
    for q in (0.5, 0.9, 0.99):
        assert float(arm.latency_cdf(np.array([np.quantile(x, q)]))[0]) == pytest.approx(
            q, abs=0.003
        )


def test_a_session_keeps_one_key_and_one_variant() -> None:
    sessions = ct.Sessions(mean_requests=20, mean_gap_s=1.0)
    events = finals(drain(traffic(ct.Scenario(sessions=sessions)), 1200, {"canary": 50}))
    by_key: dict[str, set[str]] = defaultdict(set)
    sizes: dict[str, int] = defaultdict(int)
    for e in events:
        by_key[e.event.key_hash].add(e.event.variant)
        sizes[e.event.key_hash] += 1
    assert all(len(v) == 1 for v in by_key.values())
    assert {v for vs in by_key.values() for v in vs} == {"stable", "canary"}
    assert np.mean(list(sizes.values())) == pytest.approx(20, rel=0.25)


def test_plain_traffic_gives_every_request_its_own_conversation() -> None:
    events = finals(drain(traffic(ct.Scenario()), 300, {"canary": 50}))
    assert len({e.event.key_hash for e in events}) == len(events)


@pytest.mark.parametrize("factor", [1.0, 0.9])
def test_share_mismatch_serves_the_candidate_factor_times_its_weight(factor: float) -> None:
    events = finals(drain(traffic(ct.Scenario(share_factor=factor)), 2500, {"canary": 50}))
    share = np.mean([e.event.variant == "canary" for e in events])
    assert share == pytest.approx(0.5 * factor, abs=0.012)


def test_routing_follows_the_weights_of_each_read() -> None:
    t = traffic(ct.Scenario())
    first = finals(drain(t, 100, {"canary": 0}))
    assert first
    assert all(e.event.variant == "stable" for e in first)
    assert t.candidate_requests == 0
    later = [
        e
        for e in finals(t.read(T0 + 200_000, {"canary": 100}))
        if e.event.time_unix_ms >= T0 + 100_000
    ]
    assert later
    assert all(e.event.variant == "canary" for e in later)
    assert t.candidate_requests >= len(later)
    assert t.candidate_by_checkpoint[T0 + 100_000] == 0


def test_a_hanging_request_sends_a_notice_then_its_timeout_with_the_same_id() -> None:
    sc = ct.Scenario(candidate=replace(ct.Arm(), hang_rate=1.0))
    events = drain(traffic(sc, notice_ms=5000), 400, {"canary": 10})
    hung = [e for e in events if e.event.variant == "canary"]
    by_id: dict[str, list[RecordedEvent]] = defaultdict(list)
    for e in hung:
        by_id[e.event.request_id].append(e)
    done = {k: v for k, v in by_id.items() if any(not e.event.in_flight for e in v)}
    assert done
    for evs in done.values():
        notice, final = evs
        assert notice.event.in_flight
        assert notice.event.duration_ms == 5000
        assert notice.seen_ms == notice.event.time_unix_ms
        start = notice.event.time_unix_ms - 5000
        assert final.event.time_unix_ms == start
        assert final.event.error == ErrorClass.ERROR_CLASS_TIMEOUT
        assert final.event.duration_ms == 300_000
        assert final.seen_ms == start + 300_000


def test_clopper_pearson_matches_the_exact_table() -> None:
    # Exact binomial 95% limits (e.g. Geigy Scientific Tables): 0/10 -> 0 to 0.3085,
    # 5/10 -> 0.1871 to 0.8129, 20/20 -> 0.8316 to 1.
    assert sim.clopper_pearson(0, 10) == pytest.approx((0.0, 0.3085), abs=5e-5)
    assert sim.clopper_pearson(5, 10) == pytest.approx((0.1871, 0.8129), abs=5e-5)
    assert sim.clopper_pearson(20, 20) == pytest.approx((0.8316, 1.0), abs=5e-5)


def test_replay_source_routes_by_the_stage_the_rollout_is_in() -> None:
    """The loop is closed: the source sees the weights of every stage the replay walks."""
    doc = load_experiment(EXAMPLE_EXPERIMENT).to_json_dict()
    doc["rollout"] |= {"min_stage_seconds": 30, "min_stage_samples": 20}
    spec = sim.parse_experiment(doc).spec
    seen: list[float] = []

    class Spy:
        def __init__(self) -> None:
            self.inner = traffic(ct.Scenario())

        def read(self, now_ms: int, weights: Mapping[str, float]) -> Iterable[RecordedEvent]:
            if not seen or seen[-1] != weights["canary"]:
                seen.append(weights["canary"])
            return self.inner.read(now_ms, weights)

    res = replay_source(spec, Spy(), T0, T0 + 3_600_000)
    assert res.status == "completed"
    assert seen[:5] == [2, 5, 10, 25, 50]
    assert res.events > 0


def test_one_command_fills_the_table_between_the_markers(tmp_path: Path) -> None:
    rows = [
        sim.Row("A/A plain", ct.Scenario(), 0.05, at_most=True),
        sim.Row("hangs", ct.Scenario(candidate=replace(ct.Arm(), hang_rate=0.3)), 0.95),
    ]
    settings = sim.Settings(stage_seconds=30, stage_samples=20, max_s=1800)
    summaries = sim.simulate(rows, settings, runs=2, seed=1, jobs=1)
    assert [len(s.outcomes) for s in summaries] == [2, 2]
    assert all(o.status == "rolled_back" for o in summaries[1].outcomes)
    lines = [s.line() for s in summaries]
    assert lines[1].startswith("| hangs | 2 | 2 ")
    assert "| pass |" in lines[1]
    doc = tmp_path / "EVALUATOR.md"
    doc.write_text(f"before\n{sim.START}\nold table\n{sim.END}\nafter\n")
    spec = sim.make_spec(rows[0], settings)
    sim.write_markdown(doc, sim.render(summaries, "cmd", spec, settings, 1.0))
    text = doc.read_text()
    assert "old table" not in text
    assert text.startswith("before\n")
    assert text.endswith("after\n")
    assert sim.HEADER in text
    assert lines[1] in text
    (tmp_path / "none.md").write_text("no markers\n")
    with pytest.raises(SystemExit, match="markers"):
        sim.write_markdown(tmp_path / "none.md", "x")
    assert (tmp_path / "none.md").read_text() == "no markers\n"
