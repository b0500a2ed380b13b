"""jail's own resolver for isolated jails: every name resolves to one sinkhole address.

No query ever leaves the machine, so a name cannot carry data out; each query is recorded.
Traffic to the sinkhole on ports 80/443 reaches the transparent proxy, which judges the request
by its Host header or TLS SNI, so the real address is looked up only after an allow.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

from dnslib import QTYPE, RCODE, RR, A, DNSRecord

logger = logging.getLogger("jail.dns")

SINKHOLE_TTL = 5

# name, query type, requester address, the address answered ("" for none)
QueryObserver = Callable[[str, str, str, str], None]


class SinkholeResolver(asyncio.DatagramProtocol):
    def __init__(self, sinkhole: str, observe: QueryObserver) -> None:
        self.sinkhole = sinkhole
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
        answered = ""
        for question in query.questions:
            name = str(question.qname).rstrip(".")
            qtype = QTYPE.get(question.qtype, str(question.qtype))
            if question.qtype == QTYPE.A:
                reply.add_answer(RR(question.qname, QTYPE.A, rdata=A(self.sinkhole), ttl=SINKHOLE_TTL))
                answered = self.sinkhole
            self.observe(name, qtype, addr[0], answered if question.qtype == QTYPE.A else "")
        if not query.questions:
            reply.header.rcode = RCODE.FORMERR
        assert self.transport is not None
        self.transport.sendto(reply.pack(), addr)


async def start_resolver(sock: socket.socket, sinkhole: str, observe: QueryObserver) -> asyncio.DatagramTransport:
    """Answer the queries that reach the bound UDP socket `sock`."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(lambda: SinkholeResolver(sinkhole, observe), sock=sock)
    return transport
