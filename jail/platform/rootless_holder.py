"""The namespace holder of the rootless and namespace modes, run as `python -I -S rootless_holder.py`
under `unshare --user --map-root-user --net --mount`.

It is root of a fresh user namespace that owns a fresh network and mount namespace (loopback only).
It brings loopback up, binds the proxy's socket and jail's resolver (127.0.0.1:53) inside, hides the
host's resolver and hosts files, hands the sockets to jail over the control socket (SCM_RIGHTS), and
then only waits: the namespaces live while it or the child does. It dies with jail (PR_SET_PDEATHSIG)
or when jail closes the control socket.

Given an nftables table name (rootless mode), it also routes every address to loopback and installs the
table that sends the child's TCP to any other address, on any port, to jail's transparent socket and its
DNS to jail's resolver; other UDP (QUIC too) is refused. Without one (namespace mode), nothing routes anywhere but loopback: a connection to any other
address fails at once (ENETUNREACH), so only the proxy and the resolver answer.

Standard library only: it runs without site-packages, and it is the whole of what runs privileged
(inside the user namespace). Loopback and the route are set with an ioctl and rtnetlink: no `ip` needed.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import signal
import socket
import struct
import subprocess
import sys

PR_SET_PDEATHSIG = 1
TOOL_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LISTEN_BACKLOG = 1024
DNS_PORT = 53
# linux/sockios.h, linux/if.h: loopback is brought up with an ioctl
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
IFREQ = "16sH22x"  # struct ifreq: the name, then ifr_flags in the 24-byte union
# linux/netlink.h, linux/rtnetlink.h: the route is added over rtnetlink
RTM_NEWROUTE, NLMSG_ERROR = 24, 2
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_LINK, RTN_UNICAST = 254, 3, 253, 1
RTA_OIF, RTA_PREFSRC = 4, 7


def ruleset(table: str, transparent_port: int) -> str:
    """Local traffic stays local; TCP to anywhere else (any port) is jail's, DNS anywhere is jail's, the rest is refused."""
    return f"""
table inet {table} {{
    chain steer {{
        type nat hook output priority -100;
        ip daddr != 127.0.0.0/8 meta l4proto tcp redirect to :{transparent_port}
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


def loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        name, flags = struct.unpack(IFREQ, fcntl.ioctl(sock, SIOCGIFFLAGS, struct.pack(IFREQ, b"lo", 0)))
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack(IFREQ, name, flags | IFF_UP))


def route_everything_to_loopback() -> None:
    """`ip route add default dev lo src 127.0.0.1`, over rtnetlink: the redirect then sees every destination,
    and nothing waits on a timeout. The source must be named: loopback's address has host scope, which
    the kernel would not pick for a link-scope route."""
    attributes = _attribute(RTA_OIF, struct.pack("=i", socket.if_nametoindex("lo")))
    attributes += _attribute(RTA_PREFSRC, socket.inet_aton("127.0.0.1"))
    route = struct.pack(
        "=BBBBBBBBI", socket.AF_INET, 0, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_LINK, RTN_UNICAST, 0
    )
    body = route + attributes
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.sendto(struct.pack("=LHHLL", 16 + len(body), RTM_NEWROUTE, flags, 1, 0) + body, (0, 0))
        reply = sock.recv(4096)
    kind, error = struct.unpack_from("=H", reply, 4)[0], struct.unpack_from("=i", reply, 16)[0]
    if kind != NLMSG_ERROR or error != 0:
        raise OSError(f"cannot route to loopback: {os.strerror(-error) if kind == NLMSG_ERROR else 'no answer'}")


def _attribute(kind: int, payload: bytes) -> bytes:
    """One rtattr, padded to 4 bytes."""
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


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


def build(resolv_conf: str, hosts: str, table: str | None) -> list[socket.socket]:
    """The proxy's regular socket, its transparent one (with a table only) and the resolver's."""
    loopback_up()
    sockets = [listening(socket.SOCK_STREAM)]
    if table is not None:
        route_everything_to_loopback()
        sockets.append(listening(socket.SOCK_STREAM))
        run(["nft", "-f", "-"], ruleset(table, sockets[1].getsockname()[1]))
    sockets.append(listening(socket.SOCK_DGRAM, DNS_PORT))
    for source, target in ((resolv_conf, "/etc/resolv.conf"), (hosts, "/etc/hosts")):
        if os.path.exists(target):
            run(["mount", "--bind", source, target])
    return sockets


def main() -> int:
    control = socket.socket(fileno=int(sys.argv[1]))
    resolv_conf, hosts = sys.argv[2:4]
    table = sys.argv[4] if len(sys.argv) > 4 else None
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    try:
        sockets = build(resolv_conf, hosts, table)
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
