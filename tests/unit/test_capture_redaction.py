"""Captured prompts and answers are redacted before they are cut to ``capture.max_bytes``: a
secret straddling the cut is replaced whole, never stored in part."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.config import EXAMPLE_EXPERIMENT, parse_experiment
from extproc.dataplane.event import EventBuilder
from extproc.dataplane.observer import Observation, ObserverContext
from extproc.quality.rules import REDACTED, QualityRules
from extproc.routing.decide import Policy
from extproc.telemetry.writer import Capture

pytestmark = pytest.mark.timeout(30)

LIMIT = 256
EMAIL = r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"
ADDRESS = "edge.cut@edge-mail.example.com"


def experiment(redact: list[str]) -> tuple[ObserverContext, list[Capture]]:
    doc = yaml.safe_load(EXAMPLE_EXPERIMENT.read_text())
    doc["capture"] = {"sample": 100, "max_bytes": LIMIT, "redact": redact}
    exp = parse_experiment(doc)
    stored: list[Capture] = []
    events = EventBuilder(
        experiment=exp.name,
        recorder="test",
        stable=exp.stable,
        variants=tuple(exp.variant_names),
        policy=Policy.compile(exp),
        rules=QualityRules.compile(exp.spec),
    )
    ctx = ObserverContext(events=events, emit=lambda _ev: None, capture=stored.append)
    return ctx, stored


def headers(**values: str) -> pb.HttpHeaders:
    hm = HeaderMap(headers=[HeaderValue(key=k, raw_value=v.encode()) for k, v in values.items()])
    return pb.HttpHeaders(headers=hm)


def observe(
    ctx: ObserverContext, stored: list[Capture], prompt: str, answer: str
) -> dict[str, object]:
    """One captured JSON chat request through the observer; the stored document."""
    obs = Observation(ctx)
    rh = headers(**{"x-request-id": "rid-1", "x-llm-variant": "stable"})
    obs.on_message(pb.ProcessingRequest(request_headers=rh))
    body = json.dumps({"messages": [{"role": "user", "content": prompt}]}).encode()
    obs.on_message(pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True)))
    resp = headers(**{":status": "200", "content-type": "application/json"})
    obs.on_message(pb.ProcessingRequest(response_headers=resp))
    doc = {"choices": [{"message": {"role": "assistant", "content": answer}}]}
    out = pb.HttpBody(body=json.dumps(doc).encode(), end_of_stream=True)
    obs.on_message(pb.ProcessingRequest(response_body=out))
    assert obs.emitted
    assert len(stored) == 1
    doc: dict[str, object] = json.loads(stored[0].doc)
    return doc


@pytest.mark.parametrize("before", [LIMIT - 20, LIMIT - 6, LIMIT - len(ADDRESS) + 1])
def test_an_address_straddling_the_cut_is_redacted_whole(before: int) -> None:
    ctx, stored = experiment([EMAIL])
    # "user: " prefixes the prompt as stored; the address starts `before` bytes into the text
    prompt = "p" * (before - len("user: ")) + ADDRESS + " and more text after it " * 20
    answer = "a" * before + ADDRESS + " and more text after it " * 20
    doc = observe(ctx, stored, prompt, answer)
    for text in (doc["prompt"], doc["answer"]):
        assert isinstance(text, str)
        assert "@" not in text
        assert "edge" not in text
        assert text.endswith(REDACTED)
        assert len(text.encode()) <= LIMIT + len(REDACTED)


def test_texts_are_cut_at_the_limit_without_redaction_too() -> None:
    ctx, stored = experiment([])
    doc = observe(ctx, stored, "é" * LIMIT, "€" * LIMIT)
    assert doc["prompt"] == "user: " + "é" * ((LIMIT - 6) // 2)
    assert doc["answer"] == "€" * (LIMIT // 3)  # a character is never split


@pytest.mark.parametrize(
    ("text", "limit", "stored"),
    [
        ("abc x@y.io def", 6, f"abc {REDACTED}"),  # straddles: replaced whole
        ("abc x@y.io def", 100, f"abc {REDACTED} def"),
        ("x@y.io", 3, REDACTED),
        ("abcdef x@y.io", 6, "abcdef"),  # starts after the cut: nothing of it kept
        ("ab€c", 4, "ab"),
    ],
)
def test_captured_text(text: str, limit: int, stored: str) -> None:
    rules = QualityRules(
        refusals=(), redact=(re.compile(EMAIL),), capture_share=100, capture_bytes=limit
    )
    assert rules.captured(text) == stored


def test_overlapping_patterns_redact_all_they_cover_once() -> None:
    """Two patterns matching overlapping stretches: the whole of both goes, as one mark; a
    pattern opening with its own global flags works beside the others."""
    rules = QualityRules(
        refusals=(),
        redact=(re.compile(EMAIL), re.compile(r"(?i)EXAMPLE\.COM and \w+"), re.compile("key-\\d+")),
        capture_share=100,
        capture_bytes=1_000,
    )
    got = rules.captured("mail ann@example.com and bob, key-42 key-7 end")
    assert got == f"mail {REDACTED}, {REDACTED} {REDACTED} end"


def test_patterns_with_their_own_global_flags_compile() -> None:
    """Each valid alone, as `extproc check` tests them: the sidecar compiles them too."""
    doc = yaml.safe_load(EXAMPLE_EXPERIMENT.read_text())
    doc["capture"] = {"sample": 100, "redact": ["(?s)BEGIN.*?END", EMAIL]}
    doc["quality"] = {"refusal_patterns": ["(?s)^I can.t.*help", r"\bI am unable\b"]}
    rules = QualityRules.compile(parse_experiment(doc).spec)
    assert rules.is_refusal("I can't\nreally help")
    assert rules.is_refusal("Sorry. I am unable to.")
    assert not rules.is_refusal("I can help")
    assert rules.captured("a BEGIN\nsecret END b x@y.io") == f"a {REDACTED} b {REDACTED}"
