"""The bench's idle workload (issue 24): which source address each connection comes from,
and how a count is split over load generator processes within the fd limit.

100,000 connections to one server port cannot come from one address: the kernel has one
ephemeral port range (28,232 ports by default) per source address and destination.
"""

from __future__ import annotations

import sys

import pytest

from servers import ROOT

sys.path.insert(0, str(ROOT))  # the bench package, whichever way pytest was started

from bench.run import FD_RESERVE, LOADGEN_SHARE, PROBE_MEMBERS, idle_plan
from bench.sources import addresses_needed, ports_per_address, source_address


def test_connections_fill_one_source_address_then_the_next() -> None:
    per = 26_000
    assert source_address(0, per) == "127.0.0.2"  # 127.0.0.1 is left to everything else
    assert source_address(per - 1, per) == "127.0.0.2"
    assert source_address(per, per) == "127.0.0.3"
    assert source_address(99_999, per) == "127.0.0.5"
    assert addresses_needed(100_000, per) == 4
    assert addresses_needed(0, per) == 0


def test_source_addresses_carry_over_into_the_next_octets_of_the_loopback_network() -> None:
    assert source_address(253, 1) == "127.0.0.255"
    assert source_address(254, 1) == "127.0.1.0"
    assert source_address(2**24 - 4, 1) == "127.255.255.254"
    with pytest.raises(ValueError, match="past the loopback network"):
        source_address(2**24 - 3, 1)  # 127.255.255.255: the broadcast address
    with pytest.raises(ValueError):
        source_address(0, 0)


def test_an_address_takes_the_ephemeral_port_range_less_a_margin() -> None:
    assert ports_per_address("32768\t60999\n") == 28_232 - 2_000
    assert ports_per_address("1024 65535") == 62_512
    assert ports_per_address() >= 1  # this machine's


def test_the_count_is_capped_at_what_one_worker_holds_under_the_fd_limit() -> None:
    # roomcast's default ROOMCAST_MAX_CONNECTIONS (the fd limit less a tenth), less the
    # round trip's room
    plan = idle_plan(100_000, 10, 20_000)
    assert plan["connections"] == 18_000 - PROBE_MEMBERS
    assert plan["capped_by_fd_limit"] and plan["requested"] == 100_000
    assert plan["processes"] == [(0, 18_000 - PROBE_MEMBERS)]
    assert idle_plan(100_000, 10, 4_000)["connections"] == 4_000 - FD_RESERVE - PROBE_MEMBERS


def test_several_workers_hold_more_than_one_fd_limit() -> None:
    plan = idle_plan(100_000, 10, 20_000, workers=6)
    assert plan["connections"] == 100_000 and not plan["capped_by_fd_limit"]
    # and the load generator is split to stay within the same limit per process
    assert len(plan["processes"]) == 6
    assert all(count <= 18_000 for _, count in plan["processes"])


def test_a_big_count_is_split_over_processes_in_whole_rooms() -> None:
    plan = idle_plan(100_005, 10, 1 << 20)
    assert not plan["capped_by_fd_limit"]
    shares = plan["processes"]
    assert [first for first, _ in shares] == [0, LOADGEN_SHARE, 2 * LOADGEN_SHARE]
    assert sum(count for _, count in shares) == 100_005
    assert all(count % 10 == 0 for _, count in shares[:-1])
