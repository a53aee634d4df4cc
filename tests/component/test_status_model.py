"""The status read model on a real Redis: `status --json` is a ``StatusDoc`` with a published
schema, and records another release wrote (heartbeats with fields this one lacks, or without
fields it has) never break it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from extproc import store
from extproc.cli.main import main
from extproc.config import EXAMPLE_EXPERIMENT, load_experiment
from extproc.contract import keys
from extproc.ops import model, status
from tests.conftest import run_cli

pytestmark = pytest.mark.timeout(60)


async def test_the_status_doc_of_an_experiment_with_foreign_heartbeats(
    client: aioredis.Redis,
) -> None:
    exp = load_experiment(EXAMPLE_EXPERIMENT)
    await store.register_experiment(client, exp)
    # A newer sidecar with a field this release does not know, an older one missing several.
    for instance, fields in (
        ("new-1", {"experiment": exp.name, "routing_version": 3, "dropped": 2, "gpu": "a100"}),
        ("old-1", {"experiment": exp.name, "dropped": "5"}),
        ("gone-1", {"experiment": exp.name, "dropped": "9"}),
    ):
        await store.heartbeat(client, keys.sidecar(instance), keys.SIDECARS, instance, fields, 60)
    await client.delete(keys.sidecar("gone-1"))  # stopped beating: its hash expired
    ev = {"experiment": exp.name, "active": 1, "ticks": "7", "time": 1.5, "pid": 9}
    await store.heartbeat(client, keys.evaluator("ev-1"), keys.EVALUATORS, "ev-1", ev, 60)
    doc = await status.status_doc(client, None, 100)
    assert doc is not None
    assert doc.experiment == exp.name
    assert doc.experiments == [exp.name]
    assert [s.instance for s in doc.sidecars] == ["new-1", "old-1"]
    assert doc.sidecars[0].routing_version == 3
    assert doc.telemetry.dropped == 7
    assert doc.evaluators[0].active
    assert doc.evaluators[0].ticks == 7
    assert set(doc.variants) == set(exp.spec.variants)
    assert doc.variants[exp.stable].window_requests == 0
    # What `status --json` prints is the model's JSON, and reads back as the model.
    again = model.StatusDoc.model_validate_json(doc.model_dump_json())
    assert again == doc


async def test_no_such_experiment_is_none(client: aioredis.Redis) -> None:
    assert await status.status_doc(client, "nothing", 100) is None


def test_status_publishes_its_json_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "StatusDoc"
    assert {"variants", "rollout", "audit", "sidecars", "evaluators"} <= set(schema["required"])
    figures = schema["$defs"]["VariantFigures"]
    assert figures["additionalProperties"] is False  # a renamed figure fails validation
    assert "error_rate" in figures["properties"]


def test_the_text_status_shows_each_figure_once_with_its_label(
    redis_url: str, tmp_path: Path
) -> None:
    """The table lists the model's figures under their labels: no figure without a label (a
    figure the model adds but the table does not know would print under its raw key)."""
    exp = load_experiment(EXAMPLE_EXPERIMENT)
    with store.connect_sync(redis_url) as r:
        r.flushdb()
    created = run_cli("experiment", "create", str(EXAMPLE_EXPERIMENT), "--redis-url", redis_url)
    assert created.returncode == 0, created.stderr
    out = run_cli("status", exp.name, "--redis-url", redis_url, "--state-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "time to first token p50 (ms)" in out.stdout
    rows = [line.split("  ")[0] for line in out.stdout.splitlines()]
    raw_keys = [row for row in rows if "_" in row or row.startswith(("ttft ms", "latency ms"))]
    assert raw_keys == []
