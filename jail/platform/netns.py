"""Strong Linux isolation (root): a network namespace whose only way out is jail's proxy.

    child ── vj_<id> ══ veth ══ vh_<id> ── host: proxy (regular + transparent), jail's resolver

Inside the namespace an `inet` nftables table lets out only IPv4 TCP (to the proxy, and to any other
address and port, which the host's prerouting redirects to jail's transparent listener: HTTP and TLS
are judged per request, any other stream once, by name) and DNS to jail's resolver, which gives each
name a synthetic address; everything else, UDP (so QUIC: clients fall back to TCP) and IPv6 included,
is rejected at once. The host forwards nothing for
the jail. The child runs through `ip netns exec` (which also gives it jail's resolv.conf) and
`setpriv` (no capabilities, no_new_privs, the invoking user's uid when run through sudo).

Every resource is named from the jail id, so `cleanup_orphans` can find what a killed jail left.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psutil

from jail.model import JailError, ProxyEndpoint
from jail.platform import Listeners, datagram_socket, listening_socket, system_tool, tool_path

logger = logging.getLogger("jail.netns")

STATE_DIR = Path("/run/jail")
NETNS_CONFIG_DIR = Path("/etc/netns")
# veth's largest MTU (the kernel's ETH_MAX_MTU).
LINK_MTU = 65535
# /30 blocks for the veth pairs; .1 is the host side, .2 the jail side.
SUBNET_POOL = ipaddress.ip_network("10.233.0.0/16")
NAME_PREFIX = "jail-"
JAIL_HOSTS_FILE = "127.0.0.1 localhost\n127.0.1.1 {hostname}\n::1 localhost ip6-localhost ip6-loopback\n"
DNS_PORT = 53


@dataclass(frozen=True)
class JailNames:
    """Every OS resource of one jail, derived from its id."""

    jail_id: str

    @property
    def netns(self) -> str:
        return f"{NAME_PREFIX}{self.jail_id}"

    @property
    def host_link(self) -> str:
        return f"vh_{self.jail_id}"

    @property
    def jail_link(self) -> str:
        return f"vj_{self.jail_id}"

    @property
    def nft_table(self) -> str:
        return f"jail_{self.jail_id}"

    @property
    def pid_file(self) -> Path:
        return STATE_DIR / f"{self.jail_id}.pid"

    @property
    def netns_config(self) -> Path:
        return NETNS_CONFIG_DIR / self.netns


def run_tool(argv: list[str], stdin: str | None = None) -> None:
    """Run ip/nft; a failure is jail's failure, with the tool's own words."""
    result = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise JailError(f"{' '.join(argv[:4])} failed: {result.stderr.strip() or result.returncode}")


def strong_mode_unavailable() -> str | None:
    """Why the strong backend cannot run here, or None."""
    if os.geteuid() != 0:
        return "not running as root"
    from jail.platform.rootless import nftables_unavailable

    for tool in ("ip", "nft", "setpriv"):
        if system_tool(tool) is None:
            package = {"nft": "nftables", "ip": "iproute2", "setpriv": "util-linux"}[tool]
            return f"the {tool!r} command is missing (install the {package} package)"
    return nftables_unavailable()


def _taken_networks() -> list[ipaddress.IPv4Network]:
    taken = []
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family.name == "AF_INET" and address.netmask:
                taken.append(ipaddress.ip_network(f"{address.address}/{address.netmask}", strict=False))
    return taken


def _pick_subnet(jail_id: str) -> ipaddress.IPv4Network:
    """A /30 no interface on the host uses, starting from one derived from the jail id."""
    blocks = SUBNET_POOL.num_addresses // 4
    start = int(jail_id, 16) % blocks
    taken = _taken_networks()
    for offset in range(blocks):
        index = (start + offset) % blocks
        candidate = ipaddress.ip_network((int(SUBNET_POOL.network_address) + index * 4, 30))
        if not any(candidate.overlaps(network) for network in taken):
            return candidate
    raise JailError(f"no free /30 left in {SUBNET_POOL} for another jail")


def jail_ruleset(names: JailNames, host: str, proxy_port: int) -> str:
    """Inside the namespace: only IPv4 TCP (the proxy, or redirected to jail by the host) and jail's DNS."""
    return f"""
table inet {names.nft_table} {{
    chain output {{
        type filter hook output priority 0; policy drop;
        oifname "lo" accept
        ct state established,related accept
        meta nfproto ipv4 ip daddr {host} tcp dport {proxy_port} accept
        meta nfproto ipv4 ip daddr != {host} meta l4proto tcp accept
        meta nfproto ipv4 ip daddr {host} udp dport {DNS_PORT} accept
        meta l4proto tcp reject with tcp reset
        reject with icmpx admin-prohibited
    }}
    chain input {{
        type filter hook input priority 0; policy drop;
        iifname "lo" accept
        ct state established,related accept
    }}
}}
"""


def host_ruleset(names: JailNames, host: str, proxy_ports: tuple[int, int]) -> str:
    """On the host: redirect the jail's TCP to any other address, any port, to the transparent listener;
    accept nothing else from it."""
    regular, transparent = proxy_ports
    return f"""
table inet {names.nft_table} {{
    chain prerouting {{
        type nat hook prerouting priority -100;
        iifname "{names.host_link}" ip daddr != {host} meta l4proto tcp redirect to :{transparent}
    }}
    chain input {{
        type filter hook input priority -10;
        iifname "{names.host_link}" ct state established,related accept
        iifname "{names.host_link}" ip daddr {host} tcp dport {{ {regular}, {transparent} }} accept
        iifname "{names.host_link}" ip daddr {host} udp dport {DNS_PORT} accept
        iifname "{names.host_link}" meta l4proto tcp reject with tcp reset
        iifname "{names.host_link}" reject with icmpx admin-prohibited
    }}
    chain forward {{
        type filter hook forward priority -10;
        iifname "{names.host_link}" drop
        oifname "{names.host_link}" drop
    }}
}}
"""


def child_user() -> tuple[int, int] | None:
    """The user who ran `sudo jail`, whom the child runs as."""
    uid, gid = os.environ.get("SUDO_UID"), os.environ.get("SUDO_GID")
    if uid and gid and uid.isdigit() and gid.isdigit() and uid != "0":
        return int(uid), int(gid)
    return None


class NetnsBackend:
    name = "strong"
    isolated = True

    def __init__(self, jail_id: str, user: str | None = None) -> None:
        self.jail_id = jail_id
        self.names = JailNames(jail_id)
        self.user = user
        self.subnet: ipaddress.IPv4Network | None = None

    @property
    def host_address(self) -> str:
        assert self.subnet is not None
        return str(self.subnet.network_address + 1)

    @property
    def jail_address(self) -> str:
        assert self.subnet is not None
        return str(self.subnet.network_address + 2)

    async def prepare(self) -> Listeners:
        cleanup_orphans()
        STATE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.names.pid_file.write_text(str(os.getpid()))
        with open(STATE_DIR / "subnets.lock", "w") as lock:
            # Two jails starting at once must not pick the same /30.
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.subnet = _pick_subnet(self.jail_id)
            # pyroute2's synchronous API runs its own event loop: keep it off jail's.
            await asyncio.to_thread(self._create_links)
        listeners = Listeners(
            listening_socket(self.host_address),
            listening_socket(self.host_address),
            datagram_socket(self.host_address, DNS_PORT),
        )
        try:
            self._install_firewall(listeners.regular.getsockname()[1], listeners.transparent.getsockname()[1])
        except BaseException:
            listeners.close()
            raise
        return listeners

    def _create_links(self) -> None:
        from pyroute2 import IPRoute

        names = self.names
        # The namespace side is set up with `ip -n`: pyroute2's NetNS forks a helper that inherits
        # jail's signal wake-up descriptor, and its exit would look like a signal sent to jail.
        run_tool([tool_path("ip"), "netns", "add", names.netns])
        with IPRoute() as ipr:
            # The link carries nothing but connections to jail's own proxy and resolver on this host
            # (nothing is routed on), so it can take loopback-sized packets: a bulk transfer costs the
            # kernel a fortieth of the packets it would at Ethernet's 1500 bytes.
            ipr.link(
                "add",
                ifname=names.host_link,
                kind="veth",
                mtu=LINK_MTU,
                peer={"ifname": names.jail_link, "mtu": LINK_MTU},
            )
            (host_index,) = ipr.link_lookup(ifname=names.host_link)
            (jail_index,) = ipr.link_lookup(ifname=names.jail_link)
            ipr.link("set", index=jail_index, net_ns_fd=names.netns)
            ipr.addr("add", index=host_index, address=self.host_address, prefixlen=30)
            ipr.link("set", index=host_index, state="up")
        inside = [tool_path("ip"), "-n", names.netns]
        run_tool([*inside, "link", "set", "lo", "up"])
        run_tool([*inside, "addr", "add", f"{self.jail_address}/30", "dev", names.jail_link])
        run_tool([*inside, "link", "set", names.jail_link, "up"])
        run_tool([*inside, "route", "add", "default", "via", self.host_address])
        # No IPv6 on the jail's link at all; the inet table rejects IPv6 as well.
        run_tool(
            [
                tool_path("ip"),
                "netns",
                "exec",
                names.netns,
                "sh",
                "-c",
                f"echo 1 > /proc/sys/net/ipv6/conf/{names.jail_link}/disable_ipv6",
            ]
        )

    def _install_firewall(self, regular_port: int, transparent_port: int) -> None:
        """Both sides: the proxy's ports are known once its sockets are bound."""
        names = self.names
        run_tool(
            [tool_path("ip"), "netns", "exec", names.netns, tool_path("nft"), "-f", "-"],
            jail_ruleset(names, self.host_address, regular_port),
        )
        run_tool(
            [tool_path("nft"), "-f", "-"], host_ruleset(names, self.host_address, (regular_port, transparent_port))
        )
        names.netns_config.mkdir(parents=True, exist_ok=True)
        (names.netns_config / "resolv.conf").write_text(f"nameserver {self.host_address}\n")
        # Only loopback names are local in the jail; every other name goes to jail's resolver.
        (names.netns_config / "hosts").write_text(JAIL_HOSTS_FILE.format(hostname=socket.gethostname()))

    def child_environment(self, base: dict[str, str], proxy: ProxyEndpoint) -> dict[str, str]:
        from jail.platform.weak import proxy_environment

        return proxy_environment(base, proxy, self.jail_id)

    def child_command(self, argv: list[str]) -> list[str]:
        # --pdeathsig: if jail is killed, its child dies with it rather than live on in the namespace.
        privileges = [
            tool_path("setpriv"),
            "--no-new-privs",
            "--bounding-set=-all",
            "--inh-caps=-all",
            "--pdeathsig=KILL",
        ]
        if self.user is not None:
            try:
                entry = pwd.getpwnam(self.user)
            except KeyError:
                raise JailError(f"--user: no such user {self.user!r}") from None
            privileges += [f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--init-groups"]
        elif (user := child_user()) is not None:
            privileges += [f"--reuid={user[0]}", f"--regid={user[1]}", "--clear-groups"]
        return [tool_path("ip"), "netns", "exec", self.names.netns, *privileges, "--", *argv]

    async def teardown(self) -> None:
        remove_jail(self.names)


def remove_jail(names: JailNames) -> None:
    """Remove every resource named for this jail; each step tolerates what is already gone."""
    # A namespace lives on while a process is in it: whatever a killed jail's child left must go.
    pids = subprocess.run(
        [tool_path("ip"), "netns", "pids", names.netns], capture_output=True, text=True, check=False
    ).stdout
    for pid in pids.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    subprocess.run([tool_path("nft"), "delete", "table", "inet", names.nft_table], capture_output=True, check=False)
    subprocess.run([tool_path("ip"), "link", "delete", names.host_link], capture_output=True, check=False)
    subprocess.run([tool_path("ip"), "netns", "delete", names.netns], capture_output=True, check=False)
    shutil.rmtree(names.netns_config, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        names.pid_file.unlink()


def _jail_alive(jail_id: str) -> bool:
    try:
        process = psutil.Process(int(JailNames(jail_id).pid_file.read_text()))
        return any("jail" in part for part in process.cmdline())
    except (OSError, ValueError, psutil.Error):
        return False


def existing_jail_ids() -> set[str]:
    """Ids of every jail that has some resource on this machine."""
    ids: set[str] = set()
    netns_dir = Path("/run/netns")
    if netns_dir.is_dir():
        ids |= {p.name[len(NAME_PREFIX) :] for p in netns_dir.iterdir() if p.name.startswith(NAME_PREFIX)}
    ids |= {name[3:] for name in psutil.net_if_addrs() if name.startswith("vh_")}
    if STATE_DIR.is_dir():
        ids |= {p.stem for p in STATE_DIR.glob("*.pid")}
    tables = subprocess.run([tool_path("nft"), "list", "tables"], capture_output=True, text=True, check=False).stdout
    ids |= {
        line.split()[-1][5:]
        for line in tables.splitlines()
        if line.split()[-1:] and line.split()[-1].startswith("jail_")
    }
    return {i for i in ids if len(i) == 8 and all(c in "0123456789abcdef" for c in i)}


def cleanup_orphans() -> list[str]:
    """Remove the resources of jails whose process is gone; never touch a running jail's."""
    removed = []
    for jail_id in sorted(existing_jail_ids()):
        if not _jail_alive(jail_id):
            remove_jail(JailNames(jail_id))
            removed.append(jail_id)
    return removed
