"""Two "hosts" on this machine: network namespaces joined by a veth pair, 10.x addresses, nothing else.

Each namespace has only its loopback and its end of the pair (no route out), so traffic stays between the two.
Everything made here is removed in `remove` (processes first, then the namespaces; deleting a namespace does not
end the processes in it).
"""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass

SBIN = "/usr/sbin:/sbin"
INTERFACE = "rdpo0"  # the veth end's name inside each namespace, the same in both (for GLOO_SOCKET_IFNAME)


def ip_tool() -> str | None:
    return shutil.which("ip", path=os.environ.get("PATH", "") + ":" + SBIN)


@dataclass
class Hosts:
    names: tuple[str, str]
    addresses: tuple[str, str]


def unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to make network namespaces (ip netns add)"
    if ip_tool() is None:
        return "the `ip` tool is missing: apt-get install -y iproute2 (make setup)"
    probe = f"rdpo-probe-{secrets.token_hex(3)}"
    made = subprocess.run([ip_tool(), "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"network namespaces cannot be made here: {made.stderr.strip()}"
    subprocess.run([ip_tool(), "netns", "del", probe], capture_output=True)
    return None


def make_hosts() -> Hosts:
    tag = secrets.token_hex(3)
    names = (f"rdpo-{tag}-a", f"rdpo-{tag}-b")
    octet = 16 + int(tag[:2], 16) % 200  # a /24 inside 10.0.0.0/8 per run, so parallel runs do not share one
    addresses = (f"10.{octet}.77.1", f"10.{octet}.77.2")
    ends = (f"rv{tag}a", f"rv{tag}b")  # interface names: at most 15 characters
    hosts = Hosts(names, addresses)
    try:
        for name in names:
            _ip("netns", "add", name)
            _ip("-n", name, "link", "set", "lo", "up")
        _ip("link", "add", ends[0], "type", "veth", "peer", "name", ends[1])
        for name, end, address in zip(names, ends, addresses):
            _ip("link", "set", end, "netns", name)
            _ip("-n", name, "link", "set", end, "name", INTERFACE)
            _ip("-n", name, "addr", "add", f"{address}/24", "dev", INTERFACE)
            _ip("-n", name, "link", "set", INTERFACE, "up")
    except BaseException:
        remove(hosts)
        raise
    return hosts


def exec_prefix(hosts: Hosts, index: int) -> list[str]:
    return [ip_tool(), "netns", "exec", hosts.names[index]]


def remove(hosts: Hosts) -> None:
    for name in hosts.names:
        pids = subprocess.run([ip_tool(), "netns", "pids", name], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), 9)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run([ip_tool(), "netns", "del", name], capture_output=True)  # takes its veth end with it


def _ip(*args: str) -> None:
    subprocess.run([ip_tool(), *args], check=True, capture_output=True, text=True)
