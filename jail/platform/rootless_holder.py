"""The rootless jail's namespace holder, run as `python -I -S rootless_holder.py` under `unshare -Ur -n -m`.

It is root of a fresh user namespace that owns a fresh network and mount namespace (loopback only).
It brings loopback up, routes every address to it, installs the nftables table that sends the
child's ports 80/443 to the proxy's transparent socket and its DNS to jail's resolver, binds those
sockets, hides the host's resolver and hosts files, hands the sockets to jail over the control
socket (SCM_RIGHTS), and then only waits: the namespaces live while it or the child does. It dies
with jail (PR_SET_PDEATHSIG) or when jail closes the control socket.

Standard library only: it runs without site-packages, and it is the whole of what runs privileged
(inside the user namespace) on the rootless path.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys

PR_SET_PDEATHSIG = 1
TOOL_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LISTEN_BACKLOG = 1024
DNS_PORT = 53
INTERCEPTED_PORTS = (80, 443)


def ruleset(table: str, transparent_port: int) -> str:
    """Local traffic stays local; 80/443 to anywhere else is the proxy's, DNS anywhere is jail's, the rest is refused."""
    ports = ", ".join(map(str, INTERCEPTED_PORTS))
    return f"""
table inet {table} {{
    chain steer {{
        type nat hook output priority -100;
        ip daddr != 127.0.0.0/8 tcp dport {{ {ports} }} redirect to :{transparent_port}
        ip daddr != 127.0.0.1 udp dport {DNS_PORT} redirect to :{DNS_PORT}
    }}
    chain refuse {{
        type filter hook output priority 0; policy accept;
        ip daddr 127.0.0.0/8 accept
        ip6 daddr ::1 accept
        meta l4proto tcp reject with tcp reset
        reject with icmpx admin-prohibited
    }}
}}
"""


def run(argv: list[str], stdin: str | None = None) -> None:
    env = {"PATH": TOOL_PATH, "LC_ALL": "C"}
    result = subprocess.run(argv, input=stdin, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        said = result.stderr.strip().splitlines()
        raise OSError(f"{' '.join(argv[:4])}: {said[0] if said else f'exit {result.returncode}'}")


def listening(kind: int, port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind)
    sock.bind(("127.0.0.1", port))
    if kind == socket.SOCK_STREAM:
        # Inherited by accepted connections: the proxy's small writes must not wait for Nagle.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.listen(LISTEN_BACKLOG)
    return sock


def build(table: str, resolv_conf: str, hosts: str) -> list[socket.socket]:
    run(["ip", "link", "set", "lo", "up"])
    # Every destination routes to loopback, so the redirect sees it and nothing waits on a timeout.
    run(["ip", "route", "add", "default", "dev", "lo", "src", "127.0.0.1"])
    sockets = [listening(socket.SOCK_STREAM), listening(socket.SOCK_STREAM), listening(socket.SOCK_DGRAM, DNS_PORT)]
    run(["nft", "-f", "-"], ruleset(table, sockets[1].getsockname()[1]))
    for source, target in ((resolv_conf, "/etc/resolv.conf"), (hosts, "/etc/hosts")):
        if os.path.exists(target):
            run(["mount", "--bind", source, target])
    return sockets


def main() -> int:
    control = socket.socket(fileno=int(sys.argv[1]))
    table, resolv_conf, hosts = sys.argv[2:5]
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    try:
        sockets = build(table, resolv_conf, hosts)
    except OSError as exc:
        control.sendall(json.dumps({"error": str(exc)}).encode())
        return 1
    socket.send_fds(control, [json.dumps({"ok": True}).encode()], [s.fileno() for s in sockets])
    for sock in sockets:
        sock.close()
    # Until jail closes its end (or dies): the namespaces must outlive the child's start.
    while control.recv(64):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
