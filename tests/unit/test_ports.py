"""Ports the local stack and the tests choose: free, distinct, and out of the kernel's way."""

from __future__ import annotations

import socket

import pytest

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


def test_processes_with_their_own_shares_never_choose_the_same_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Parallel test workers choose ports at once, each in its own share of the range."""
    monkeypatch.setattr(stack, "_handed_out", set())
    monkeypatch.setattr(stack, "_share", stack._share)  # this worker's own, restored after
    chosen = []
    for index in range(3):
        stack.share_ports(index, 3)
        chosen.append({stack.free_port() for _ in range(30)})
    assert not chosen[0] & chosen[1]
    assert not chosen[1] & chosen[2]
    assert not chosen[0] & chosen[2]
    if (low := stack._ephemeral_low()) is not None and low > 11_000:
        width = (low - 10_000) // 3
        for index, ports in enumerate(chosen):
            assert all(10_000 + index * width <= p < 10_000 + (index + 1) * width for p in ports)
    with pytest.raises(ValueError, match="share 3 of 3"):
        stack.share_ports(3, 3)
