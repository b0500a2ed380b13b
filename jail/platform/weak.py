"""Weak mode: the child is only steered by environment variables.

Programs that honour HTTP(S)_PROXY go through the proxy; anything else (raw sockets,
`curl --noproxy '*'`, Node's built-in fetch) goes straight out. Use a stronger backend to enforce.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from jail.model import ProxyEndpoint
from jail.platform import Listeners, listening_socket

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
# Each points at a bundle of the system CAs plus jail's, for clients that replace their trust list.
CA_BUNDLE_VARIABLES = (
    "SSL_CERT_FILE",
    "CURL_CA_BUNDLE",
    "GIT_SSL_CAINFO",
    "REQUESTS_CA_BUNDLE",
    "PIP_CERT",
    "DENO_CERT",
    "npm_config_cafile",
)
NO_PROXY_ALWAYS = ("localhost", "127.0.0.1", "::1")


def proxy_environment(base: dict[str, str], proxy: ProxyEndpoint, jail_id: str) -> dict[str, str]:
    """The child's environment: the caller's, with proxy and CA settings that steer it to jail."""
    env = dict(base)
    for name in PROXY_VARIABLES:
        env[name] = env[name.lower()] = proxy.url
    # Only loopback goes around jail: a host in the caller's NO_PROXY (a corporate one, say) would be reached
    # unjudged. jail itself honours that NO_PROXY when it picks the route upstream.
    env["NO_PROXY"] = env["no_proxy"] = ",".join(NO_PROXY_ALWAYS)
    for name in CA_BUNDLE_VARIABLES:
        env[name] = str(proxy.ca_bundle)
    # Node adds this to its built-in list, so the CA certificate alone is enough there.
    env["NODE_EXTRA_CA_CERTS"] = str(proxy.ca_cert)
    env["SSL_CERT_DIR"] = str(proxy.ca_bundle.parent)  # holds certificates only
    env["JAIL_ID"] = jail_id
    return env


CONNECT_HELPER = Path(__file__).with_name("connect_helper.py")


def ssh_proxy_command(proxy: ProxyEndpoint) -> str:
    """The ProxyCommand (ssh runs it with the shell and expands %h and %p) that tunnels through jail:
    jail's own interpreter (the child runs as jail's user) without site-packages, on the shipped helper."""
    argv = [sys.executable, "-I", "-S", str(CONNECT_HELPER), proxy.address]
    # `%` starts one of ssh's tokens: a literal one in a path is written `%%`.
    return " ".join(shlex.quote(arg).replace("%", "%%") for arg in argv) + " %h %p"


def ssh_command(proxy: ProxyEndpoint) -> str:
    """`GIT_SSH_COMMAND`: ssh with jail's ProxyCommand (git appends its own arguments)."""
    return "ssh -o " + shlex.quote(f"ProxyCommand={ssh_proxy_command(proxy)}")


class WeakBackend:
    name = "weak"
    isolated = False

    def __init__(self, jail_id: str) -> None:
        self.jail_id = jail_id

    async def prepare(self) -> Listeners:
        return Listeners(listening_socket("127.0.0.1"))

    def child_environment(self, base: dict[str, str], proxy: ProxyEndpoint) -> dict[str, str]:
        env = proxy_environment(base, proxy, self.jail_id)
        # git over SSH goes through jail too, judged as tcp://host:port; a command the caller set is theirs.
        # Only here: the isolated modes judge every TCP connection without the client's help.
        env.setdefault("GIT_SSH_COMMAND", ssh_command(proxy))
        return env

    def child_command(self, argv: list[str]) -> list[str]:
        return argv

    async def teardown(self) -> None:
        pass
