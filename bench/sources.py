"""Which loopback address each of the load generator's idle connections comes from.

A TCP connection is told apart by its 4-tuple. Every idle connection goes to the same
server address and port, so from one source address the kernel can open at most as many
as the ephemeral port range holds (``net.ipv4.ip_local_port_range``: 28,232 ports by
default): 100,000 connections from 127.0.0.1 alone are impossible. Every address of
127.0.0.0/8 is the loopback interface's, so the load generator spreads its connections
over 127.0.0.2, 127.0.0.3, ... (127.0.0.1 stays for everything else on the machine), each
with the whole port range to itself, and no system setting has to change.

Standard library only: the tests import it without the bench's dependencies.
"""

from __future__ import annotations

import ipaddress

#: the first source address; 127.0.0.1 is left to the rest of the machine
FIRST_SOURCE = ipaddress.IPv4Address("127.0.0.2")
LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")
PORT_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"
#: ports of the range left unused on each address: connections of earlier runs still in
#: TIME_WAIT, and any other program's connections from that address
PORT_MARGIN = 2_000


def source_address(index: int, per_address: int) -> str:
    """The source address of the load generator's connection number ``index`` (counted
    over all of its processes): ``per_address`` connections from 127.0.0.2, the next
    ``per_address`` from 127.0.0.3, and so on."""
    if index < 0 or per_address < 1:
        raise ValueError(f"connection {index} with {per_address} per address")
    address = FIRST_SOURCE + index // per_address
    if address not in LOOPBACK or address == LOOPBACK.broadcast_address:
        raise ValueError(f"connection {index}: {address} is past the loopback network")
    return str(address)


def ports_per_address(port_range: str | None = None) -> int:
    """How many connections to one server address and port the kernel can open from one
    source address: the ephemeral port range (``port_range``, as the sysctl prints it; by
    default read from /proc) less :data:`PORT_MARGIN`."""
    if port_range is None:
        try:
            with open(PORT_RANGE) as f:
                port_range = f.read()
        except OSError:
            port_range = "32768 60999"  # Linux's default
    low, high = (int(part) for part in port_range.split())
    return max(1, high - low + 1 - PORT_MARGIN)


def addresses_needed(connections: int, per_address: int) -> int:
    """How many source addresses ``connections`` connections use."""
    return -(-connections // per_address) if connections > 0 else 0
