"""A second host for tests: a network namespace joined to this one by a veth pair, so a
test can run a client "elsewhere" and then make that host vanish (its link goes down and
its packets stop, with no FIN and no RST), which loopback cannot show."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class PeerHost:
    namespace: str
    device: str
    server_address: str
    peer_address: str

    def run(self, *command: str, **kwargs: object) -> subprocess.Popen[bytes]:
        """Start ``command`` inside the peer host's namespace."""
        return subprocess.Popen(["ip", "netns", "exec", self.namespace, *command], **kwargs)  # type: ignore[call-overload]

    def vanish(self) -> None:
        """Take the peer's link down: from now on its packets are lost, both ways."""
        _ip("netns", "exec", self.namespace, "ip", "link", "set", "dev", "eth0", "down")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def can_make_hosts() -> str | None:
    """Why peer hosts cannot be made here, or ``None`` if they can."""
    if shutil.which("ip") is None:
        return "iproute2's ip is not installed"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    return None


@contextmanager
def peer_host() -> Iterator[PeerHost]:
    tag = secrets.token_hex(3)
    namespace, device = f"rcpeer{tag}", f"rc{tag}"
    subnet = 16 + secrets.randbelow(200)
    server, peer = f"10.253.{subnet}.1", f"10.253.{subnet}.2"
    _ip("netns", "add", namespace)
    try:
        _ip("link", "add", device, "type", "veth", "peer", "name", "eth0", "netns", namespace)
        _ip("addr", "add", f"{server}/30", "dev", device)
        _ip("link", "set", "dev", device, "up")
        inside = ("netns", "exec", namespace, "ip")
        _ip(*inside, "addr", "add", f"{peer}/30", "dev", "eth0")
        _ip(*inside, "link", "set", "dev", "eth0", "up")
        _ip(*inside, "link", "set", "dev", "lo", "up")
        yield PeerHost(namespace, device, server, peer)
    finally:
        subprocess.run(["ip", "link", "del", device], capture_output=True)
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
