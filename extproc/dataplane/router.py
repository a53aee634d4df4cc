"""The blocking phase: answer Envoy's request-headers message with the variant to route to.

This is the only message Envoy waits for, so it is kept small: the answer for each variant is a
prebuilt ProcessingResponse (set ``x-llm-variant``, clear the route cache so Envoy re-selects the
route), and any unexpected failure answers with the stable variant rather than an error.

A request in the captured sample gets the same answer with a ``mode_override`` (prebuilt too):
Envoy then sends its request body, response headers and response body on the same stream, for the
capture; no other request's body ever reaches the sidecar. A mirrored copy (the shadow listener's
mark) is routed by its listener, so its answer only asks for its bodies when it is captured.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3.http_status_pb2 import HttpStatus
from google.protobuf.struct_pb2 import Struct, Value

from extproc.config import Experiment
from extproc.contract import headers as h
from extproc.contract.envoy import METADATA_NAMESPACE, PASSED_KEY, SHADOW_CLUSTER
from extproc.contract.errors import RoutingError
from extproc.contract.selection import RequestTraits, Selector
from extproc.routing.decide import Policy, forced_variant, hashed_variant, read_headers
from extproc.routing.live import LiveRouting

log = logging.getLogger(__name__)

Answer = pb.ProcessingResponse
FORCED_MARK = "1"
"""``x-llm-forced`` on a request a tester forced."""
OVERRIDE_MARK = "override"
"""``x-llm-forced`` on a request a category override pinned."""


def _set(key: str, value: str) -> HeaderValueOption:
    return HeaderValueOption(
        header=HeaderValue(key=key, raw_value=value.encode()),
        append_action=HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


@dataclass(frozen=True)
class FleetMarks:
    """What a fleet sidecar adds to each answer, for the fleet listener's one experiment route:
    the experiment (for the access log), the variant's cluster (``cluster_header``), the shadow
    variant's cluster for a mirrored copy, and the forcing headers to strip (the route is shared
    by every experiment, so it cannot name each one's)."""

    experiment: str
    clusters: dict[str, str]  # variant -> Envoy cluster
    shadow_cluster: str | None
    strip: tuple[str, ...]

    @classmethod
    def of(cls, experiment: Experiment) -> FleetMarks:
        spec = experiment.spec
        shadow = spec.shadow.variant
        return cls(
            experiment=experiment.name,
            clusters={name: v.cluster for name, v in spec.variants.items()},
            shadow_cluster=spec.variants[shadow].cluster if shadow else None,
            strip=tuple(spec.forced_routing.strip),
        )


PASS_THROUGH = pb.ProcessingResponse(
    request_headers=pb.HeadersResponse(response=pb.CommonResponse(clear_route_cache=True)),
    dynamic_metadata=Struct(
        fields={
            METADATA_NAMESPACE: Value(
                struct_value=Struct(fields={PASSED_KEY: Value(bool_value=True)})
            )
        }
    ),
)
"""A fleet sidecar's answer to a request no experiment takes: untouched, but routed again, so
that a gateway route matching the body's model (metadata that arrived after Envoy first picked
the route) sees it; marked for the access log, which must not file it under an experiment that
appeared meanwhile."""


def variant_response(
    variant: str,
    mirror: bool = False,
    forced: str | None = None,
    fleet: FleetMarks | None = None,
) -> pb.ProcessingResponse:
    """The prebuilt answer routing to ``variant``; ``forced`` is the mark of a pinned request
    (``FORCED_MARK`` or ``OVERRIDE_MARK``) for the access log."""
    headers = [_set(h.VARIANT, variant)]
    if mirror:
        headers.append(_set(h.SHADOW, SHADOW_CLUSTER))
    if forced:
        headers.append(_set(h.FORCED, forced))
    remove: list[str] = []
    if fleet is not None:
        headers.append(_set(h.EXPERIMENT, fleet.experiment))
        headers.append(_set(h.CLUSTER, fleet.clusters[variant]))
        if mirror and fleet.shadow_cluster:
            headers.append(_set(h.SHADOW_TARGET, fleet.shadow_cluster))
        remove = list(fleet.strip)
    mutation = pb.HeaderMutation(set_headers=headers, remove_headers=remove)
    return pb.ProcessingResponse(
        request_headers=pb.HeadersResponse(
            response=pb.CommonResponse(header_mutation=mutation, clear_route_cache=True)
        )
    )


def error_response(err: RoutingError) -> pb.ProcessingResponse:
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=HttpStatus(code=err.status),
            headers=pb.HeaderMutation(
                set_headers=[
                    HeaderValueOption(
                        header=HeaderValue(key="content-type", raw_value=b"application/json")
                    )
                ]
            ),
            body=err.body(),
            details=f"extproc_{type(err).__name__}",
        )
    )


CAPTURE_MODE = ProcessingMode(
    request_header_mode=ProcessingMode.SEND,  # already sent; Envoy ignores it here
    response_header_mode=ProcessingMode.SEND,
    request_body_mode=ProcessingMode.BUFFERED_PARTIAL,
    response_body_mode=ProcessingMode.STREAMED,
    request_trailer_mode=ProcessingMode.SKIP,
    response_trailer_mode=ProcessingMode.SKIP,
)
"""What a captured request's answer asks for. Not BUFFERED: Envoy would refuse a body over its
buffer limit with 413, and a capture must never fail a request.

The request body is BUFFERED_PARTIAL (one message, the body up to the buffer limit with its end),
not STREAMED: streamed, Envoy sends the body and then an empty end-of-stream message, and passes
the body on upstream as soon as the first is answered. A model that answers at once then finishes
the response before the sidecar has answered the second: Envoy resets the upstream request it
never finished sending and cancels the mirrored copy with it, so the shadow side of the pair was
lost whenever the sidecar answered a little late (a loaded host)."""

_PASS = pb.ProcessingResponse(request_headers=pb.HeadersResponse())


def capturing(answer: pb.ProcessingResponse) -> pb.ProcessingResponse:
    """``answer`` that also asks for the request's bodies and response headers."""
    out = pb.ProcessingResponse()
    out.CopyFrom(answer)
    out.mode_override.CopyFrom(CAPTURE_MODE)
    return out


# Answers for messages the router does not ask for; sent only if Envoy is configured differently.
_CONTINUE = {
    "response_headers": pb.ProcessingResponse(response_headers=pb.HeadersResponse()),
    "request_body": pb.ProcessingResponse(request_body=pb.BodyResponse()),
    "response_body": pb.ProcessingResponse(response_body=pb.BodyResponse()),
    "request_trailers": pb.ProcessingResponse(request_trailers=pb.TrailersResponse()),
    "response_trailers": pb.ProcessingResponse(response_trailers=pb.TrailersResponse()),
}


def continue_answer(req: pb.ProcessingRequest) -> pb.ProcessingResponse | None:
    """The do-nothing answer to a message other than the request headers; None for those."""
    return _CONTINUE.get(req.WhichOneof("request") or "")


class Router:
    """Routes each request of one experiment; ``captures`` (a pure function of the request id,
    so a mirrored copy agrees with its primary) picks the requests whose bodies the sidecar asks
    for; None: none. With ``fleet`` marks, every answer also names the experiment and the
    variant's cluster, for a fleet listener."""

    def __init__(
        self,
        live: LiveRouting,
        captures: Callable[[str], bool] | None = None,
        fleet: FleetMarks | None = None,
    ) -> None:
        self.live = live
        self.policy = Policy.compile(live.experiment)
        spec = live.experiment.spec
        names = live.experiment.variant_names

        def answers(*, mirror: bool = False, forced: str | None = None) -> dict[str, Answer]:
            return {v: variant_response(v, mirror, forced, fleet) for v in names}

        self.responses = answers()
        self.mirrored = answers(mirror=True)
        # A forced request carries the mark the access log reads (mirrored as any other).
        self.forced = answers(forced=FORCED_MARK)
        self.forced_mirrored = answers(mirror=True, forced=FORCED_MARK)
        self.overridden = answers(forced=OVERRIDE_MARK)
        self.overrides, _ = Selector.build(
            {(i, o.variant): o for i, o in enumerate(spec.overrides)}
        )
        self.override_headers = self.overrides.header_names
        self.fallback = self.responses[live.experiment.stable]
        self.shadow = spec.shadow.variant
        self.shadow_share = spec.shadow.share / 100 if spec.shadow.variant else 0.0
        self.captures = captures
        # Keyed by the prebuilt answer's identity: every answer but a refusal is one of these.
        self.captured = {
            id(r): (r, capturing(r))
            for group in (
                self.responses,
                self.mirrored,
                self.forced,
                self.forced_mirrored,
                self.overridden,
            )
            for r in (*group.values(), _PASS)
        }
        self.wanted = self.policy.wanted | self.override_headers

    def on_request_headers(self, headers: pb.HttpHeaders) -> pb.ProcessingResponse:
        try:
            hdrs = read_headers(headers.headers, self.wanted)
        except Exception:
            log.exception("reading headers failed; sending the stable variant")
            return self.fallback
        return self.decide(hdrs)

    def decide(
        self, hdrs: dict[str, bytes], model: str | None = None, route: str | None = None
    ) -> pb.ProcessingResponse:
        """The answer for a request with these headers (read with :attr:`wanted`), body model
        and gateway route (known on a fleet listener only)."""
        answer = self._route(hdrs, model, route)
        captures = self.captures
        if captures is None or answer.HasField("immediate_response"):
            return answer
        if captures(hdrs.get(h.REQUEST_ID, b"").decode("utf-8", "replace")):
            return self.captured[id(answer)][1]
        return answer

    def _route(
        self, hdrs: dict[str, bytes], model: str | None, route: str | None
    ) -> pb.ProcessingResponse:
        if h.SHADOW_COPY in hdrs:
            return _PASS  # the shadow listener's copy: its listener routes it
        routing = self.live.current
        try:
            forced = forced_variant(self.policy, routing, hdrs)
            if forced is None and self.overrides.by_key:
                pinned = self.overrides.pick(RequestTraits(model, route, hdrs))
                if pinned is not None:
                    return self.overridden[pinned[1]]
            variant = forced or hashed_variant(self.policy, routing, hdrs)
            if (
                self.shadow_share
                and variant != self.shadow
                and (self.shadow_share >= 1 or random.random() < self.shadow_share)
            ):
                return (self.forced_mirrored if forced else self.mirrored)[variant]
            return (self.forced if forced else self.responses)[variant]
        except RoutingError as err:
            return error_response(err)
        except Exception:
            log.exception("routing failed; sending the stable variant")
            return self.fallback

    def answer(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse:
        phase = req.WhichOneof("request")
        if phase == "request_headers":
            return self.on_request_headers(req.request_headers)
        return _CONTINUE.get(phase or "", self.fallback)
