"""The sidecar's CPU per access-log entry, stage by stage, measured in-process.

Why: on two cores every microsecond the sidecar spends on an entry is taken from Envoy, so the
native plane's throughput follows it (docs/PERFORMANCE.md); `bench/run.py` measures the whole
process, whose figure moves by a fifth between runs on a shared machine. This script times the
package's own code on a batch of entries as Envoy's gRPC access log delivers them, with process
CPU time (not wall time), so it holds on a busy machine and tells which stage a change moved.

Stages, in the order the sidecar runs them per entry:
  decode   the access-log message (protobuf), per entry
  map      entry to telemetry event (``EntryMapper.event``: attribution, inspector fields,
           answer signals)
  metrics  Prometheus (``SidecarMetrics.observe``)
  write    what the writer prepares for Redis per batch (rollups, open-request sets, the
           serialized events, the command's encoding); Redis itself is not run

The answer's length matters: the refusal patterns run over the first 600 characters of each
answer. ``--answer-chars`` sets it (the benchmark's upstream answers 78 characters).

    .venv/bin/python bench/entry_cost.py [--entries 5000] [--answer-chars 78] [--repeat 5]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import hiredis
from envoy.config.core.v3.base_pb2 import Metadata
from envoy.service.accesslog.v3 import als_pb2
from google.protobuf.struct_pb2 import Struct

from extproc.config import load_experiment
from extproc.contract.envoy import METADATA_NAMESPACE
from extproc.dataplane.accesslog import EntryMapper
from extproc.dataplane.event import EventBuilder
from extproc.telemetry.prometheus import SidecarMetrics
from extproc.telemetry.v1.event_pb2 import TelemetryEvent
from extproc.telemetry.writer import _open_sets, _rollups

BATCH = 500  # the writer's batch size
START_MS = 1_700_000_000_000
SENTENCE = "The capital of France is Paris, and it has been the seat of government since 987. "


def answer(chars: int) -> str:
    """An ordinary answer (no refusal) of ``chars`` characters."""
    return (SENTENCE * (chars // len(SENTENCE) + 1))[:chars]


def message(entries: int, text: str) -> bytes:
    """One access-log message as Envoy sends it: a chat completion per entry, 10% on the
    canary, each with the inspector's metadata."""
    body = (
        '{"id":"chatcmpl-bench","object":"chat.completion","choices":[{"index":0,"message":'
        f'{{"role":"assistant","content":"{text}"}},"finish_reason":"stop"}}],'
        '"usage":{"prompt_tokens":12,"completion_tokens":40,"total_tokens":52}}'
    )
    msg = als_pb2.StreamAccessLogsMessage()
    for i in range(entries):
        e = msg.http_logs.log_entry.add()
        e.request.request_id = f"rid-{i}"
        e.request.request_headers["x-conversation-id"] = f"conv-{i % 997}"
        e.response.response_code.value = 200
        e.response.response_code_details = "via_upstream"
        e.response.response_body_bytes = len(body)
        e.response.response_headers["x-llm-variant"] = "canary" if i % 10 == 0 else "stable"
        e.response.response_headers["content-type"] = "application/json"
        c = e.common_properties
        c.start_time.FromMilliseconds(START_MS + i)
        c.time_to_first_downstream_tx_byte.FromMilliseconds(40)
        c.time_to_last_downstream_tx_byte.FromMilliseconds(41)
        c.route_name = "weighted"
        c.response_flags.SetInParent()
        md = Struct()
        md.update(
            {
                "format": "chat",
                "text": text,
                "first_token_us": 1e15 + 4e4,
                "prompt_tokens": 12,
                "completion_tokens": 40,
                "finish_reason": "stop",
            }
        )
        c.metadata.CopyFrom(Metadata(filter_metadata={METADATA_NAMESPACE: md}))
    return msg.SerializeToString()


def cpu_us_per_entry(fn: Callable[[], object], entries: int, repeat: int) -> float:
    """The fastest of ``repeat`` runs, in process CPU microseconds per entry."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best / entries * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=5_000)
    ap.add_argument("--answer-chars", type=int, default=78)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    exp = load_experiment("extproc/data/demo-experiment.yaml")
    mapper = EntryMapper.for_experiment(exp, EventBuilder.for_experiment(exp, "bench"))
    metrics = SidecarMetrics()
    raw = message(args.entries, answer(args.answer_chars))
    entries = list(als_pb2.StreamAccessLogsMessage.FromString(raw).http_logs.log_entry)
    events: list[TelemetryEvent] = [mapper.event(e) for e in entries]

    def write() -> None:
        for i in range(0, len(events), BATCH):
            batch = events[i : i + BATCH]
            rollup_keys, rollup_args = _rollups(exp.name, batch, 86_400)
            open_keys, open_args = _open_sets(exp.name, batch, 0.0)
            hiredis.pack_command(
                (
                    "EVALSHA",
                    "sha",
                    len(rollup_keys) + len(open_keys),
                    *rollup_keys,
                    *open_keys,
                    *(ev.SerializeToString() for ev in batch),
                    *rollup_args,
                    *open_args,
                )
            )

    stages: dict[str, Callable[[], object]] = {
        "decode": lambda: als_pb2.StreamAccessLogsMessage.FromString(raw),
        "map": lambda: [mapper.event(e) for e in entries],
        "metrics": lambda: [metrics.observe(ev) for ev in events],
        "write": write,
    }
    print(
        f"bench/entry_cost.py: {args.entries} entries, answers of {args.answer_chars} "
        f"characters, fastest of {args.repeat} runs, process CPU per entry"
    )
    total = 0.0
    for name, fn in stages.items():
        us = cpu_us_per_entry(fn, args.entries, args.repeat)
        total += us
        print(f"  {name:<8} {us:7.2f} us")
    print(f"  {'total':<8} {total:7.2f} us")


if __name__ == "__main__":
    main()
