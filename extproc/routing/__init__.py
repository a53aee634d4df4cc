"""Which variant a request goes to: the live routing followed from Redis and the per-request
decision (forced routing, sticky assignment) the ext_proc data plane applies.
"""
