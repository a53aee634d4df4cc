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

from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3.http_status_pb2 import HttpStatus

from extproc.contract import headers as h
from extproc.contract.envoy import SHADOW_CLUSTER
from extproc.contract.errors import RoutingError
from extproc.routing.decide import Policy, choose_variant, read_headers
from extproc.routing.live import LiveRouting

log = logging.getLogger(__name__)


def _set(key: str, value: str) -> HeaderValueOption:
    return HeaderValueOption(
        header=HeaderValue(key=key, raw_value=value.encode()),
        append_action=HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def variant_response(
    variant: str, mirror: bool = False, forced: bool = False
) -> pb.ProcessingResponse:
    headers = [_set(h.VARIANT, variant)]
    if mirror:
        headers.append(_set(h.SHADOW, SHADOW_CLUSTER))
    if forced:
        headers.append(_set(h.FORCED, "1"))
    mutation = pb.HeaderMutation(set_headers=headers)
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
    request_body_mode=ProcessingMode.STREAMED,
    response_body_mode=ProcessingMode.STREAMED,
    request_trailer_mode=ProcessingMode.SKIP,
    response_trailer_mode=ProcessingMode.SKIP,
)
"""What a captured request's answer asks for. STREAMED rather than BUFFERED: Envoy would refuse
a body over its buffer limit with 413, and a capture must never fail a request."""

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


class Router:
    """Routes each request; ``captures`` (a pure function of the request id, so a mirrored copy
    agrees with its primary) picks the requests whose bodies the sidecar asks for; None: none."""

    def __init__(self, live: LiveRouting, captures: Callable[[str], bool] | None = None) -> None:
        self.live = live
        self.policy = Policy.compile(live.experiment)
        spec = live.experiment.spec
        names = live.experiment.variant_names
        self.responses = {v: variant_response(v) for v in names}
        self.mirrored = {v: variant_response(v, mirror=True) for v in names}
        # A forced request carries the mark the access log reads (mirrored as any other).
        self.forced = {v: variant_response(v, forced=True) for v in names}
        self.forced_mirrored = {v: variant_response(v, mirror=True, forced=True) for v in names}
        self.fallback = self.responses[live.experiment.stable]
        self.shadow = spec.shadow.variant
        self.shadow_share = spec.shadow.share / 100 if spec.shadow.variant else 0.0
        self.captures = captures
        # Keyed by the prebuilt answer's identity: every answer but a refusal is one of these.
        self.captured = {
            id(r): (r, capturing(r))
            for answers in (self.responses, self.mirrored, self.forced, self.forced_mirrored)
            for r in (*answers.values(), _PASS)
        }

    def on_request_headers(self, headers: pb.HttpHeaders) -> pb.ProcessingResponse:
        try:
            hdrs = read_headers(headers.headers, self.policy.wanted)
        except Exception:
            log.exception("reading headers failed; sending the stable variant")
            return self.fallback
        answer = self._route(hdrs)
        captures = self.captures
        if captures is None or answer.HasField("immediate_response"):
            return answer
        if captures(hdrs.get(h.REQUEST_ID, b"").decode("utf-8", "replace")):
            return self.captured[id(answer)][1]
        return answer

    def _route(self, hdrs: dict[str, bytes]) -> pb.ProcessingResponse:
        if h.SHADOW_COPY in hdrs:
            return _PASS  # the shadow listener's copy: its listener routes it
        routing = self.live.current
        try:
            variant = choose_variant(self.policy, routing, hdrs)
            # A forcing header with a value either forced the variant or raised.
            header = self.policy.forced_header
            forced = header is not None and bool(hdrs.get(header))
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
