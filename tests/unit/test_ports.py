"""Ports the local stack and the tests choose: free, distinct, and out of the kernel's way."""

from __future__ import annotations

import socket

from extproc.dev import stack


def test_ports_are_distinct_free_and_below_the_ephemeral_range() -> None:
    """Outgoing connections take their source ports from the ephemeral range: a port chosen
    there could be taken between choosing and binding it (seen as random start-up failures)."""
    low = stack._ephemeral_low()
    ports = [stack.free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    if low is not None:
        assert all(p < low for p in ports)
    for p in ports:
        with socket.socket() as s:
            # As every server the stack starts binds (SO_REUSEADDR): a port whose last
            # connection lingers in TIME_WAIT is free for it, if not for a plain bind.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", p))  # still free to bind
