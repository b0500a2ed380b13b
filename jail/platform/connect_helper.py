"""An SSH ProxyCommand that goes through jail's proxy: `python3 -I -S connect_helper.py PROXY HOST PORT`.

It runs inside the jailed child (standard library only, no site-packages): it opens a tunnel with
`CONNECT HOST:PORT` to jail's proxy at PROXY (`host:port`), saying that the tunnel carries a plain TCP
stream, so jail judges it at once as `tcp://HOST:PORT` and a refusal comes back as a 403 whose reason is
printed on stderr, where the SSH client shows it. Once the tunnel is open, stdin goes to it and what
comes back goes to stdout, until either side closes.
"""

from __future__ import annotations

import os
import socket
import sys
import threading

# Tells jail that the tunnel carries a plain TCP stream (not HTTP, not TLS): judge it now, as tcp.
TUNNEL_HEADER = "Jail-Tunnel: tcp"
HEADER_LIMIT = 64 * 1024
CHUNK = 64 * 1024


class TunnelRefused(Exception):
    """The proxy did not open the tunnel; the message is what to tell the user."""


def authority(host: str, port: str) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def open_tunnel(proxy: tuple[str, int], host: str, port: str) -> tuple[socket.socket, bytes]:
    """The connected socket and any stream bytes that came with the proxy's answer."""
    target = authority(host, port)
    sock = socket.create_connection(proxy)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{TUNNEL_HEADER}\r\n\r\n".encode())
    answer = b""
    while b"\r\n\r\n" not in answer:
        data = sock.recv(CHUNK)
        if not data or len(answer) > HEADER_LIMIT:
            sock.close()
            raise TunnelRefused(f"jail's proxy closed the tunnel to {target} before answering")
        answer += data
    head, _, rest = answer.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    if len(parts) >= 2 and parts[1] == "200":
        return sock, rest
    body = rest + read_body(sock, head, len(rest))
    sock.close()
    reason = body.decode("utf-8", "replace").strip() or status_line
    raise TunnelRefused(reason if reason.startswith("jail:") else f"jail: {reason}")


def read_body(sock: socket.socket, head: bytes, have: int) -> bytes:
    """The rest of the refusal's body (by Content-Length, else until the proxy closes)."""
    length = None
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            length = int(value.strip())
    body = b""
    while length is None or have + len(body) < length:
        data = sock.recv(CHUNK)
        if not data:
            break
        body += data
    return body


def pump_stdin(sock: socket.socket) -> None:
    """stdin to the tunnel; at its end, the tunnel's sending half is closed."""
    try:
        while data := os.read(0, CHUNK):
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def relay(sock: socket.socket, first: bytes) -> None:
    threading.Thread(target=pump_stdin, args=(sock,), daemon=True).start()
    data = first
    while True:
        while data:
            written = os.write(1, data)
            data = data[written:]
        try:
            data = sock.recv(CHUNK)
        except OSError:
            return
        if not data:
            return


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: connect_helper.py PROXY_HOST:PORT HOST PORT", file=sys.stderr)
        return 2
    proxy, host, port = argv
    try:
        sock, first = open_tunnel(split_address(proxy), host, port)
    except TunnelRefused as exc:
        print(exc, file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"jail: cannot reach jail's proxy at {proxy}: {exc}", file=sys.stderr)
        return 1
    relay(sock, first)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
