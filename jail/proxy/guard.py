"""The address guard: an allowed name must not become a way into the machine or its networks.

Each allowed request's host is resolved once; every address is checked, and the proxy dials
exactly an address that passed (no second lookup between check and dial, so DNS rebinding
cannot slip loopback in). Refused whatever the rule says: loopback, unspecified, link-local and
cloud-metadata, multicast, broadcast, and jail's own ranges; in isolated modes also the private
ranges, which a jailed program could not reach directly either.

What a guard said about an address (and which address an IP literal is) is remembered until its
settings change: checking every network costs more per request than the rest of the guard.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass, field

from jail.model import canonical_ip

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def networks(*cidrs: str) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(cidr) for cidr in cidrs)


# (class name, reason code, networks): the first class holding an address says why it is refused.
AddressClass = tuple[str, str, tuple[Network, ...]]
ALWAYS_REFUSED: tuple[AddressClass, ...] = (
    ("loopback", "loopback_address", networks("127.0.0.0/8", "::1/128")),
    ("unspecified", "unspecified_address", networks("0.0.0.0/8", "::/128")),
    (
        "link-local or cloud metadata",
        "metadata_address",
        networks("169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128", "100.100.100.200/32", "168.63.129.16/32"),
    ),
    ("multicast", "multicast_address", networks("224.0.0.0/4", "ff00::/8")),
    ("broadcast", "broadcast_address", networks("255.255.255.255/32")),
)
PRIVATE: AddressClass = (
    "private",
    "private_address",
    networks("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7"),
)
# The veth pool of strong jails: never reachable through the proxy, whatever --allow-private says.
JAIL_INTERNAL = networks("10.233.0.0/16")


@dataclass(frozen=True)
class Refusal:
    address: str
    reason: str
    reason_code: str


# Remembered verdicts and literals per guard; past this many, the memory starts over.
MEMORY_ENTRIES = 4096
# With an upstream proxy the local lookup is only a screen: a resolver that does not answer must not
# hold every request up.
PROXIED_LOOKUP_SECONDS = 2.0


@dataclass
class AddressGuard:
    isolated: bool
    allowed: tuple[Network, ...] = ()
    own: tuple[Network, ...] = field(default=JAIL_INTERNAL)
    _verdicts: dict[str, Refusal | None] = field(default_factory=dict, init=False, repr=False, compare=False)
    _literals: dict[str, str | None] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, value)
        if name in ("isolated", "allowed", "own") and "_verdicts" in self.__dict__:
            self._verdicts.clear()

    def check(self, address: str) -> Refusal | None:
        try:
            return self._verdicts[address]
        except KeyError:
            pass
        if len(self._verdicts) >= MEMORY_ENTRIES:
            self._verdicts.clear()
        verdict = self._verdicts[address] = self._check(address)
        return verdict

    def _check(self, address: str) -> Refusal | None:
        ip = canonical_ip(ipaddress.ip_address(address))
        if any(ip in network for network in self.own):
            return Refusal(str(ip), f"{ip} is one of jail's own addresses", "jail_address")
        if any(ip in network for network in self.allowed):
            return None
        classes = ALWAYS_REFUSED + ((PRIVATE,) if self.isolated else ())
        for name, code, members in classes:
            if any(ip in network for network in members):
                hint = f"allow it with --allow-private {ip}/{ip.max_prefixlen}"
                return Refusal(str(ip), f"{ip} is a {name} address; {hint}", code)
        return None

    def _literal(self, host: str) -> str | None:
        """The canonical form of an IP literal; None for a name."""
        try:
            return self._literals[host]
        except KeyError:
            pass
        try:
            literal: str | None = str(canonical_ip(ipaddress.ip_address(host)))
        except ValueError:
            literal = None
        if len(self._literals) >= MEMORY_ENTRIES:
            self._literals.clear()
        self._literals[host] = literal
        return literal

    async def resolve(self, host: str, port: int) -> list[str]:
        """Every address of `host`, in the resolver's order; an IP literal is itself."""
        if (literal := self._literal(host)) is not None:
            return [literal]
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        seen: dict[str, None] = {}
        for _family, _type, _proto, _name, sockaddr in infos:
            seen[str(canonical_ip(ipaddress.ip_address(sockaddr[0])))] = None
        return list(seen)

    async def screen(self, host: str, port: int) -> Refusal | None:
        """For a request an upstream proxy resolves and dials: an IP literal is checked as for a direct
        dial; a name by what it resolves to here, when it resolves (refused if none of its addresses may
        be dialled). A name that does not resolve here in time (split DNS, only the proxy resolves) is left
        to the proxy: where the proxy connects is beyond what jail can see."""
        try:
            addresses = await asyncio.wait_for(self.resolve(host, port), PROXIED_LOOKUP_SECONDS)
        except (OSError, TimeoutError):
            return None
        refusals = [self.check(address) for address in addresses]
        return refusals[0] if refusals and all(refusals) else None

    async def choose(self, host: str, port: int) -> tuple[str | None, Refusal | None]:
        """The address to dial, or why none may be dialled."""
        try:
            addresses = await self.resolve(host, port)
        except OSError as exc:
            return None, Refusal("", f"cannot resolve {host}: {exc.strerror or exc}", "resolve_failed")
        first_refusal = None
        for address in addresses:
            refusal = self.check(address)
            if refusal is None:
                return address, None
            first_refusal = first_refusal or refusal
        return None, first_refusal
