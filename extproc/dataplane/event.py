"""One request's telemetry event, built by the same code whichever data plane saw the request.

The ext_proc observer (``observer.py``) watches a request message by message; the native plane
(``accesslog.py``) reads Envoy's access-log entry once it ended. Each plane only translates what
it saw into an :class:`Observed` record, in its own units and from its own sources; the event, and
everything derived rather than measured (the shadow copy's variant, the error class, the answer's
quality signals), comes from :class:`EventBuilder`. So the same request gives the same event on
either plane by construction, and a new field or signal is added in one place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from extproc.config import Experiment
from extproc.quality.rules import SIGNAL_CHARS, QualityRules
from extproc.routing.decide import Attribution, Policy, attribute
from extproc.telemetry.v1.event_pb2 import ApiFormat, Assignment, ErrorClass, TelemetryEvent


@dataclass(slots=True)
class Observed:
    """What a data plane saw of one request; unknown stays at its default, never guessed.

    The observer fills one in as the stream's messages arrive, the access log in one go. Times
    are milliseconds since the request started (the plane converts from its own clock, so each
    keeps its exact arithmetic); ``headers_ms`` is None when no response headers were sent, which
    is also how the builder knows the response never began.
    """

    # Who: the attribution of the request (see ``EventBuilder.attribute``).
    request_id: str = ""
    variant: str = ""
    """The variant the request was routed to; a shadow copy's is replaced by the builder."""
    assignment: Assignment.ValueType = Assignment.ASSIGNMENT_UNSPECIFIED
    key_hash: str = ""
    shadow: bool = False
    captured: bool = False
    # When.
    start_unix_ms: int = 0
    headers_ms: float | None = None
    first_token_ms: float | None = None
    duration_ms: float | None = None
    """Until the plane last saw the request; kept only if the response began or completed."""
    # How it ended.
    status: int = 0
    code_details: str = ""
    """Envoy's ``response_code_details`` (``upstream_reset_...``, ``..._timeout``)."""
    completed: bool = False
    """The whole response reached the client."""
    upstream_failure: ErrorClass.ValueType | None = None
    """A timeout or reset Envoy's response flags name (the access log has them, ext_proc not)."""
    # The response.
    streamed: bool = False
    response_bytes: int = 0
    api_format: ApiFormat.ValueType = ApiFormat.API_FORMAT_UNSPECIFIED
    """The API the body spoke (UNKNOWN: none the plane reads); UNSPECIFIED: no body was read."""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_prompt_tokens: int | None = None
    finish_reason: str = ""
    tool_calls: bool = False
    answer: str | None = None
    """The answer's text as far as the plane kept it; None when the body had none to parse."""
    answer_kept_bytes: int = SIGNAL_CHARS
    """At most this much of the answer was kept: a JSON answer reaching it may have been cut."""
    json_asked: bool = False
    """The request asked for a JSON answer (known only where the plane saw the request body)."""
    json_verdict: bool | None = None
    """Whether the JSON answer parsed, judged where more of it was kept than ``answer`` holds
    (a captured request's stream, for its access-log entry); None: judge ``answer`` here."""


# Enum members as plain values: each ``ErrorClass.X`` is a Python-level attribute lookup on the
# generated wrapper (about 0.8 us), which the access log's path paid per request.
_NONE = ErrorClass.ERROR_CLASS_NONE
_DISCONNECT = ErrorClass.ERROR_CLASS_CLIENT_DISCONNECT
_CLIENT_ERROR = ErrorClass.ERROR_CLASS_CLIENT_ERROR
_TIMEOUT = ErrorClass.ERROR_CLASS_TIMEOUT
_RESET = ErrorClass.ERROR_CLASS_RESET
_UPSTREAM_5XX = ErrorClass.ERROR_CLASS_UPSTREAM_5XX


def classify(seen: Observed) -> ErrorClass.ValueType:
    """What went wrong, if anything (see ErrorClass in proto/): the failure Envoy's flags name,
    else what the status, Envoy's code details and how far the response got say."""
    if seen.upstream_failure is not None:
        return seen.upstream_failure
    if seen.headers_ms is None:
        return _DISCONNECT
    details = seen.code_details
    if "timeout" in details:
        return _TIMEOUT
    if details.startswith(("upstream_reset", "upstream_connect")) or "reset" in details:
        return _RESET
    if seen.status >= 500:
        return _UPSTREAM_5XX
    if not seen.completed:
        return _DISCONNECT
    if seen.status >= 400:
        return _CLIENT_ERROR
    return _NONE


@dataclass(frozen=True)
class EventBuilder:
    """The per-experiment part of every event, and the one mapping from :class:`Observed` to the
    ``TelemetryEvent``; compiled once per sidecar and shared by both data planes."""

    experiment: str
    recorder: str
    stable: str
    variants: tuple[str, ...]
    policy: Policy
    rules: QualityRules
    shadow_variant: str | None = None

    @classmethod
    def for_experiment(
        cls, experiment: Experiment, recorder: str, policy: Policy | None = None
    ) -> EventBuilder:
        """From the experiment file; ``policy`` shares the router's compiled one."""
        return cls(
            experiment=experiment.name,
            recorder=recorder,
            stable=experiment.stable,
            variants=tuple(experiment.variant_names),
            policy=Policy.compile(experiment) if policy is None else policy,
            rules=QualityRules.compile(experiment.spec),
            shadow_variant=experiment.spec.shadow.variant,
        )

    def attribute(self, hdrs: dict[str, bytes]) -> Attribution:
        """Variant, assignment and key pseudonym from the request's headers (with the variant
        header the route chose)."""
        return attribute(self.policy, self.stable, hdrs, self.variants)

    def _variant(self, seen: Observed) -> str:
        # A mirrored copy is the shadow variant's answer, whichever route carried it.
        if seen.shadow and self.shadow_variant is not None:
            return self.shadow_variant
        return seen.variant

    def event(self, seen: Observed) -> TelemetryEvent:
        """The request's one final event."""
        ev = TelemetryEvent(
            time_unix_ms=seen.start_unix_ms,
            request_id=seen.request_id,
            experiment=self.experiment,
            variant=self._variant(seen),
            key_hash=seen.key_hash,
            assignment=seen.assignment,
            status=seen.status,
            error=classify(seen),
            response_bytes=seen.response_bytes,
            finish_reason=seen.finish_reason,
            recorder=self.recorder,
        )
        # Flags only when set: each field given costs the message a lookup by name.
        if seen.streamed:
            ev.streamed = True
        if seen.shadow:
            ev.shadow = True
        if seen.tool_calls:
            ev.tool_calls = True
        if seen.captured:
            ev.captured = True
        if seen.status < 400:  # an error body is in no answer format
            ev.api_format = seen.api_format
        if seen.headers_ms is not None:
            ev.headers_ms = seen.headers_ms
        if seen.first_token_ms is not None:
            ev.first_token_ms = seen.first_token_ms
        if seen.duration_ms is not None and (seen.completed or seen.headers_ms is not None):
            ev.duration_ms = seen.duration_ms
        if seen.prompt_tokens is not None:
            ev.prompt_tokens = seen.prompt_tokens
        if seen.completion_tokens is not None:
            ev.completion_tokens = seen.completion_tokens
        if seen.cached_prompt_tokens is not None:
            ev.cached_prompt_tokens = seen.cached_prompt_tokens
        self._answer_signals(ev, seen)
        return ev

    def _answer_signals(self, ev: TelemetryEvent, seen: Observed) -> None:
        """Refusal, empty answer, length and JSON validity: only for answers (an error body's
        text says nothing about the model)."""
        text = seen.answer
        if text is None or seen.status >= 400:
            return
        ev.refusal = self.rules.is_refusal(text)
        ev.empty_answer = not text.strip() and not seen.tool_calls
        ev.answer_chars = len(text)
        if seen.completed and seen.json_asked:
            valid = seen.json_verdict
            if valid is None:
                valid = json_valid(text, seen.answer_kept_bytes)
            if valid is not None:
                ev.json_valid = valid

    def notice(self, seen: Observed, time_unix_ms: int, age_ms: float) -> TelemetryEvent:
        """The in-flight notice of a request still open: who it is, sent at ``time_unix_ms``
        when it was ``age_ms`` old (docs/EVALUATOR.md, "Hangs")."""
        return TelemetryEvent(
            time_unix_ms=time_unix_ms,
            duration_ms=age_ms,
            in_flight=True,
            request_id=seen.request_id,
            experiment=self.experiment,
            variant=self._variant(seen),
            key_hash=seen.key_hash,
            assignment=seen.assignment,
            shadow=seen.shadow,
            recorder=self.recorder,
        )


def json_valid(answer: str, kept_bytes: int) -> bool | None:
    """Whether a JSON-mode answer parses; None when it may have been cut at ``kept_bytes`` (a
    plane keeps at most that much, cut inside the last UTF-8 character)."""
    if len(answer.encode("utf-8", "surrogatepass")) >= kept_bytes - 4:
        return None
    try:
        json.loads(answer)
    except (ValueError, RecursionError):
        return False
    return True
