"""jail's own resolver for isolated jails: no query ever leaves the machine, so a name cannot carry
data out; each query is recorded.

Every isolated backend (strong, rootless, Docker) sends every TCP port to jail, and each name gets a
synthetic address of its own (`SyntheticNames`, 198.18.0.0/15, kept for the run): a connection to that
address, on any port, tells jail which name the child meant, and jail judges it by that name. The real
address is looked up only after an allow.

AAAA queries get an empty answer (the name exists, with no IPv6 address): the isolated modes have no
IPv6 route at all, and a client then uses the IPv4 address at once instead of trying IPv6 first.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable

from dnslib import QTYPE, RCODE, RR, A, DNSRecord

logger = logging.getLogger("jail.dns")

# A synthetic address stays the name's for the whole run: it may be cached as long as a run lasts.
SYNTHETIC_TTL = 300
# The benchmarking range (RFC 2544): no one routes it, so it never names a real server. Its first two
# addresses are left out: .0 is the network's, .1 stays unused (it was once jail's one answer for all).
SYNTHETIC_NETWORK = ipaddress.ip_network("198.18.0.0/15")
FIRST_SYNTHETIC = 2

# name, query type, requester address, the address answered ("" for none)
QueryObserver = Callable[[str, str, str, str], None]
# The address a name resolves to in the jail, or None when there is none to give.
Answer = Callable[[str], str | None]


class SyntheticNames:
    """One address of SYNTHETIC_NETWORK per name, handed out in order and kept for the run; the proxy
    side asks which name an address stands for."""

    def __init__(self, network: ipaddress.IPv4Network = SYNTHETIC_NETWORK) -> None:
        self.network = network
        self._next = int(network.network_address) + FIRST_SYNTHETIC
        self._by_name: dict[str, str] = {}
        self._by_address: dict[str, str] = {}

    def address_for(self, name: str) -> str | None:
        """The name's address (the same one every time); None once the range is used up."""
        name = name.rstrip(".").lower()
        if (address := self._by_name.get(name)) is not None:
            return address
        if self._next > int(self.network.broadcast_address) - 1:
            logger.warning("no synthetic address left for %s: %d names were given one", name, len(self._by_name))
            return None
        address = str(ipaddress.IPv4Address(self._next))
        self._next += 1
        self._by_name[name] = address
        self._by_address[address] = name
        return address

    def covers(self, address: str) -> bool:
        """Whether `address` is in the synthetic range (given to a name or not)."""
        try:
            return ipaddress.ip_address(address) in self.network
        except ValueError:
            return False

    def name_for(self, address: str) -> str | None:
        """The name a synthetic address was given to; None for any other address."""
        return self._by_address.get(address)


class JailResolver(asyncio.DatagramProtocol):
    """Answers A queries with `answer(name)`, everything else with no address."""

    def __init__(self, answer: Answer, ttl: int, observe: QueryObserver) -> None:
        self.answer = answer
        self.ttl = ttl
        self.observe = observe
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            query = DNSRecord.parse(data)
        except Exception:  # dnslib raises several types on garbage; garbage gets no answer
            logger.info("dropped a malformed DNS packet from %s", addr[0])
            return
        reply = query.reply()
        for question in query.questions:
            name = str(question.qname).rstrip(".")
            qtype = QTYPE.get(question.qtype, str(question.qtype))
            answered = ""
            if question.qtype == QTYPE.A:
                answered = self.answer(name) or ""
                if answered:
                    reply.add_answer(RR(question.qname, QTYPE.A, rdata=A(answered), ttl=self.ttl))
                else:
                    reply.header.rcode = RCODE.SERVFAIL
            self.observe(name, qtype, addr[0], answered)
        if not query.questions:
            reply.header.rcode = RCODE.FORMERR
        assert self.transport is not None
        self.transport.sendto(reply.pack(), addr)


async def start_resolver(
    sock: socket.socket, observe: QueryObserver, names: SyntheticNames
) -> asyncio.DatagramTransport:
    """Answer the queries that reach the bound UDP socket `sock` with `names`' addresses."""
    loop = asyncio.get_running_loop()
    resolver = JailResolver(names.address_for, SYNTHETIC_TTL, observe)
    transport, _ = await loop.create_datagram_endpoint(lambda: resolver, sock=sock)
    return transport
