"""The blocking phase: answer Envoy's request-headers message with the variant to route to.

This is the only message Envoy waits for, so it is kept small: the answer for each variant is a
prebuilt ProcessingResponse (set ``x-llm-variant``, clear the route cache so Envoy re-selects the
route), and any unexpected failure answers with the stable variant rather than an error.
"""

from __future__ import annotations

import logging
import random

from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
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


def variant_response(variant: str, mirror: bool = False) -> pb.ProcessingResponse:
    headers = [_set(h.VARIANT, variant)]
    if mirror:
        headers.append(_set(h.SHADOW, SHADOW_CLUSTER))
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


# Answers for messages the router does not ask for; sent only if Envoy is configured differently.
_CONTINUE = {
    "response_headers": pb.ProcessingResponse(response_headers=pb.HeadersResponse()),
    "request_body": pb.ProcessingResponse(request_body=pb.BodyResponse()),
    "response_body": pb.ProcessingResponse(response_body=pb.BodyResponse()),
    "request_trailers": pb.ProcessingResponse(request_trailers=pb.TrailersResponse()),
    "response_trailers": pb.ProcessingResponse(response_trailers=pb.TrailersResponse()),
}


class Router:
    def __init__(self, live: LiveRouting) -> None:
        self.live = live
        self.policy = Policy.compile(live.experiment)
        spec = live.experiment.spec
        self.responses = {v: variant_response(v) for v in live.experiment.variant_names}
        self.mirrored = {v: variant_response(v, mirror=True) for v in live.experiment.variant_names}
        self.fallback = self.responses[live.experiment.stable]
        self.shadow = spec.shadow.variant
        self.shadow_share = spec.shadow.share / 100 if spec.shadow.variant else 0.0

    def on_request_headers(self, headers: pb.HttpHeaders) -> pb.ProcessingResponse:
        routing = self.live.current
        try:
            hdrs = read_headers(headers.headers, self.policy.wanted)
            variant = choose_variant(self.policy, routing, hdrs)
            if (
                self.shadow_share
                and variant != self.shadow
                and (self.shadow_share >= 1 or random.random() < self.shadow_share)
            ):
                return self.mirrored[variant]
            return self.responses[variant]
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
