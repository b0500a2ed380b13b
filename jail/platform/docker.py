"""Docker backend (root): the container's only way out is jail.

    container ── eth0 ══ jb_<id> (bridge of the network jail-<id>) ── host: proxy, jail's resolver

Each jail gets its own bridge network on a free /29 of 10.234.0.0/16, and a host nftables table
`inet jail_<id>` on the bridge (the strong mode's host ruleset) is what confines it: TCP to any other
address and any port is redirected to jail's transparent listener, which judges HTTP and TLS per request
and any other stream once, by name (jail.proxy.streams); the gateway accepts only the proxy's ports and
DNS; everything else (UDP, so QUIC, included) is rejected, and nothing is forwarded to or from the
bridge, IPv4 and IPv6. The container's resolver is jail's (`dns=[gateway]`), which gives each name a
synthetic address (jail.proxy.dns.SyntheticNames). The network is not Docker's `internal` kind: recent
Docker gives a container on one no default route, and the synthetic addresses must reach the bridge to
be redirected; the table is in place before the container starts. The container trusts jail's CA
through the weak mode's variables and a read-only mount of the CA certificate and bundle; the key never
enters it.

The child process is `python -m jail.platform.docker_attach SPEC`: it creates and starts the
container, attaches stdio, forwards signals and exits with the container's status.
Every resource is named (and labelled) from the jail id, so `cleanup_orphans` finds what a killed
jail left; the pid file is the strong mode's, so neither backend's cleanup touches a running jail.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jail.model import JailError, ProxyEndpoint
from jail.platform import Listeners, datagram_socket, listening_socket
from jail.platform.netns import (
    DNS_PORT,
    STATE_DIR,
    JailNames,
    _jail_alive,
    _taken_networks,
    host_ruleset,
    run_tool,
)
from jail.platform.weak import PROXY_VARIABLES, proxy_environment

logger = logging.getLogger("jail.docker")

SUBNET_POOL = ipaddress.ip_network("10.234.0.0/16")
SUBNET_PREFIX = 29
LABEL = "jail.id"
REMOVE_LABEL = "jail.rm"
# Where the container finds jail's CA: certificates only, mounted read-only.
CA_MOUNT_DIR = "/etc/jail"
CA_CERT_IN_CONTAINER = f"{CA_MOUNT_DIR}/ca-cert.pem"
CA_BUNDLE_IN_CONTAINER = f"{CA_MOUNT_DIR}/ca-bundle.pem"
DOCKER_SOCKETS = ("/var/run/docker.sock", "/run/docker.sock", "/run/containerd/containerd.sock")
# Capabilities that let a container change its network or leave its confinement.
REFUSED_CAPABILITIES = {"ALL", "NET_ADMIN", "SYS_ADMIN", "SYS_MODULE", "SYS_RAWIO", "BPF", "DAC_READ_SEARCH"}
API_TIMEOUT = 30


@dataclass(frozen=True)
class DockerNames(JailNames):
    """The strong mode's names (pid file, nft table), with the Docker bridge as the host-side link."""

    @property
    def host_link(self) -> str:
        return f"jb_{self.jail_id}"

    @property
    def network(self) -> str:
        return f"jail-{self.jail_id}"

    @property
    def container(self) -> str:
        return f"jail-{self.jail_id}"

    @property
    def spec_file(self) -> Path:
        return STATE_DIR / f"{self.jail_id}.docker.json"


# ---------------------------------------------------------------------------------------------
# `docker run` arguments


@dataclass
class RunSpec:
    """The `docker run` arguments jail understands."""

    image: str = ""
    command: list[str] = field(default_factory=list)
    remove: bool = False
    interactive: bool = False
    tty: bool = False
    init: bool = False
    env: list[str] = field(default_factory=list)  # K=V, or K to take jail's own value
    volumes: list[str] = field(default_factory=list)
    workdir: str | None = None
    user: str | None = None
    name: str | None = None
    hostname: str | None = None
    entrypoint: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    cap_add: list[str] = field(default_factory=list)
    cap_drop: list[str] = field(default_factory=list)
    namespaces: dict[str, str] = field(default_factory=dict)  # pid/ipc/uts/userns → mode


BOOL_OPTIONS = {
    "--rm": "remove",
    "-i": "interactive",
    "--interactive": "interactive",
    "-t": "tty",
    "--tty": "tty",
    "--init": "init",
}
VALUE_OPTIONS = {
    "-e": "env",
    "--env": "env",
    "-v": "volumes",
    "--volume": "volumes",
    "-w": "workdir",
    "--workdir": "workdir",
    "-u": "user",
    "--user": "user",
    "--name": "name",
    "-h": "hostname",
    "--hostname": "hostname",
    "--entrypoint": "entrypoint",
    "-l": "labels",
    "--label": "labels",
    "--cap-add": "cap_add",
    "--cap-drop": "cap_drop",
    "--pid": "pid",
    "--ipc": "ipc",
    "--uts": "uts",
    "--userns": "userns",
}
REFUSED_OPTIONS = {
    "--network": "the jail gives the container its own network",
    "--net": "the jail gives the container its own network",
    "--privileged": "a privileged container can change its own firewall and routes",
    "--device": "a host device gives the container a way around the jail",
    "-d": "jail must stay attached to the container to judge its requests",
    "--detach": "jail must stay attached to the container to judge its requests",
    "-p": "the jail's network takes no connection from outside: nothing can be published",
    "--publish": "the jail's network takes no connection from outside: nothing can be published",
    "-P": "the jail's network takes no connection from outside: nothing can be published",
    "--publish-all": "the jail's network takes no connection from outside: nothing can be published",
}


def _refuse(option: str, why: str) -> JailError:
    return JailError(f"--docker-run: `docker run {option}` is not allowed in a jail: {why}")


def parse_run_args(argv: list[str]) -> RunSpec:
    """`[docker run options] IMAGE [COMMAND...]` the way docker's flag parser reads them."""
    spec = RunSpec()
    index = 0
    while index < len(argv):
        token = argv[index]
        index += 1
        if token == "--":
            break
        if not token.startswith("-") or token == "-":
            spec.image = token
            spec.command = argv[index:]
            break
        if token.startswith("--"):
            option, has_value, inline = token.partition("=")
            pairs = [(option, inline if has_value else None)]
        else:
            # A cluster of short options (`-it`); a value option takes the rest of the cluster.
            pairs = []
            letters = token[1:]
            for position, letter in enumerate(letters):
                option = f"-{letter}"
                if option in VALUE_OPTIONS and position + 1 < len(letters):
                    pairs.append((option, letters[position + 1 :].removeprefix("=")))
                    break
                pairs.append((option, None))
        for option, value in pairs:
            if option in REFUSED_OPTIONS:
                raise _refuse(option, REFUSED_OPTIONS[option])
            if option in BOOL_OPTIONS:
                if value not in (None, "true", "false"):
                    raise JailError(f"--docker-run: {option} takes no value (or =true/=false), got {value!r}")
                setattr(spec, BOOL_OPTIONS[option], value != "false")
                continue
            if option not in VALUE_OPTIONS:
                raise JailError(f"--docker-run: unknown or unsupported docker run option {option}")
            if value is None:
                if index >= len(argv):
                    raise JailError(f"--docker-run: {option} needs a value")
                value = argv[index]
                index += 1
            _apply(spec, option, VALUE_OPTIONS[option], value)
    if not spec.image and index < len(argv):
        spec.image, spec.command = argv[index], argv[index + 1 :]
    if not spec.image:
        raise JailError("--docker-run: no image given: jail --docker-run -- [docker run options] IMAGE [COMMAND...]")
    return spec


def _apply(spec: RunSpec, option: str, key: str, value: str) -> None:
    if key == "env":
        spec.env.append(value)
    elif key == "volumes":
        _check_volume(option, value)
        spec.volumes.append(value)
    elif key == "labels":
        name, _, label_value = value.partition("=")
        spec.labels[name] = label_value
    elif key == "cap_add":
        capability = value.upper().removeprefix("CAP_")
        if capability in REFUSED_CAPABILITIES:
            raise _refuse(f"{option} {value}", "it lets the container change its network or leave its confinement")
        spec.cap_add.append(value)
    elif key == "cap_drop":
        spec.cap_drop.append(value)
    elif key in ("pid", "ipc", "uts", "userns"):
        if value == "host" or value.startswith("container:"):
            raise _refuse(f"{option} {value}", f"it shares a {key} namespace outside the jail")
        spec.namespaces[key] = value
    else:
        setattr(spec, key, value)


def docker_sockets() -> list[str]:
    sockets = list(DOCKER_SOCKETS)
    host = os.environ.get("DOCKER_HOST", "")
    if host.startswith("unix://"):
        sockets.append(host[len("unix://") :])
    return sockets


def _check_volume(option: str, value: str) -> None:
    """Refuse a mount that holds the Docker (or containerd) socket: it controls the host."""
    source = value.split(":", 1)[0]
    if ":" not in value or not source.startswith(("/", ".", "~")):
        return  # an anonymous or named volume
    source_path = os.path.realpath(os.path.expanduser(source))
    for socket_path in docker_sockets():
        real = os.path.realpath(socket_path)
        for candidate in {socket_path, real}:
            if candidate == source_path or candidate.startswith(source_path.rstrip("/") + "/"):
                raise _refuse(f"{option} {value}", f"it gives the container {socket_path}, which controls the host")


# ---------------------------------------------------------------------------------------------
# Docker daemon


def docker_client(timeout: int = API_TIMEOUT) -> Any:
    """A client of the daemon DOCKER_HOST names (the default socket otherwise), or a JailError."""
    import docker

    try:
        client = docker.from_env(timeout=timeout)
        client.ping()
    except docker.errors.DockerException as exc:
        where = os.environ.get("DOCKER_HOST") or "the default socket"
        raise JailError(f"--docker-run: cannot reach the Docker daemon ({where}): {exc}") from None
    return client


def docker_unavailable() -> str | None:
    """Why the Docker backend cannot run here, or None (the daemon itself is checked in prepare)."""
    if os.geteuid() != 0:
        return "it needs root, to firewall the container's network with nftables on the host"
    if shutil.which("nft") is None:
        return "the 'nft' command is missing (install the nftables package)"
    return None


def _docker_subnets(client: Any) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    subnets = []
    for network in client.networks.list():
        for config in (network.attrs.get("IPAM") or {}).get("Config") or []:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                subnets.append(ipaddress.ip_network(config["Subnet"], strict=False))
    return subnets


def _free_subnets(jail_id: str, taken: list) -> Any:
    """Free /29s of the pool, starting from one derived from the jail id."""
    size = 2 ** (32 - SUBNET_PREFIX)
    blocks = SUBNET_POOL.num_addresses // size
    start = int(jail_id, 16) % blocks
    for offset in range(blocks):
        index = (start + offset) % blocks
        candidate = ipaddress.ip_network((int(SUBNET_POOL.network_address) + index * size, SUBNET_PREFIX))
        if not any(candidate.overlaps(network) for network in taken if network.version == 4):
            yield candidate


def container_environment(
    spec: RunSpec, proxy: ProxyEndpoint, jail_id: str, additions: dict[str, str], own: dict[str, str] | None = None
) -> dict[str, str]:
    """The session's additions (secret placeholders, never the real values), the user's `-e`, then
    jail's proxy and CA variables, with paths inside the container."""
    own = os.environ if own is None else own
    env: dict[str, str] = dict(additions)
    for entry in spec.env:
        name, has_value, value = entry.partition("=")
        if has_value:
            env[name] = value
        elif name in additions:  # a secret: the container gets its placeholder
            env[name] = additions[name]
        elif name in own:  # `-e NAME`: jail's own value, as docker run does
            env[name] = own[name]
    inside = ProxyEndpoint(proxy.host, proxy.port, Path(CA_CERT_IN_CONTAINER), Path(CA_BUNDLE_IN_CONTAINER))
    return proxy_environment(env, inside, jail_id)


class DockerBackend:
    name = "docker"
    isolated = True

    def __init__(self, jail_id: str) -> None:
        self.jail_id = jail_id
        self.names = DockerNames(jail_id)
        self.subnet: ipaddress.IPv4Network | None = None
        self.client: Any = None
        self.proxy: ProxyEndpoint | None = None
        self.base_env: dict[str, str] = {}
        self.attach_env: dict[str, str] = {}

    @property
    def gateway(self) -> str:
        assert self.subnet is not None
        return str(self.subnet.network_address + 1)

    async def prepare(self) -> Listeners:
        if (reason := docker_unavailable()) is not None:
            raise JailError(f"--docker-run: {reason}")
        self.client = await asyncio.to_thread(docker_client)
        await asyncio.to_thread(cleanup_orphans, self.client)
        STATE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.names.pid_file.write_text(str(os.getpid()))
        await asyncio.to_thread(self._create_network)
        listeners = Listeners(
            listening_socket(self.gateway),
            listening_socket(self.gateway),
            datagram_socket(self.gateway, DNS_PORT),
        )
        ports = (listeners.regular.getsockname()[1], listeners.transparent.getsockname()[1])
        try:
            # The strong mode's host table, on the bridge: every TCP port of any other address redirected,
            # only the proxy and DNS accepted at the gateway, nothing forwarded.
            run_tool(["nft", "-f", "-"], host_ruleset(self.names, self.gateway, ports))
        except BaseException:
            listeners.close()
            raise
        return listeners

    def _create_network(self) -> None:
        import docker

        names = self.names
        with open(STATE_DIR / "docker-subnets.lock", "w") as lock:
            # Two jails starting at once must not pick the same subnet.
            fcntl.flock(lock, fcntl.LOCK_EX)
            taken = _taken_networks() + _docker_subnets(self.client)
            for attempt, subnet in enumerate(_free_subnets(self.jail_id, taken)):
                gateway = str(subnet.network_address + 1)
                ipam = docker.types.IPAMConfig(
                    pool_configs=[docker.types.IPAMPool(subnet=str(subnet), gateway=gateway)]
                )
                try:
                    self.client.networks.create(
                        names.network,
                        driver="bridge",
                        # Not `internal`: the container needs its default route (see the module's doc).
                        internal=False,
                        ipam=ipam,
                        labels={LABEL: self.jail_id},
                        options={
                            "com.docker.network.bridge.name": names.host_link,
                            "com.docker.network.bridge.enable_ip_masquerade": "false",
                        },
                    )
                except docker.errors.APIError as exc:
                    # Another daemon's or a namespace's network the host cannot see: try the next one.
                    if "overlap" in str(exc).lower() and attempt < 16:
                        continue
                    raise JailError(f"--docker-run: cannot create the network {names.network}: {exc}") from None
                self.subnet = subnet
                break
            else:
                raise JailError(f"--docker-run: no free /{SUBNET_PREFIX} left in {SUBNET_POOL} for another jail")
        # No IPv6 on the bridge at all; the nft table rejects IPv6 as well.
        with contextlib.suppress(OSError):
            Path(f"/proc/sys/net/ipv6/conf/{names.host_link}/disable_ipv6").write_text("1")

    def child_environment(self, base: dict[str, str], proxy: ProxyEndpoint) -> dict[str, str]:
        """The attach program's environment: jail's own (it talks to dockerd), never the proxy's."""
        self.proxy = proxy
        self.base_env = dict(base)
        env = {k: v for k, v in base.items() if k.upper() not in (*PROXY_VARIABLES, "NO_PROXY")}
        env["JAIL_ID"] = self.jail_id
        # The session may still add to it (secret placeholders): child_command reads it then.
        self.attach_env = env
        return env

    def _session_additions(self) -> dict[str, str]:
        """What the session put in the child's environment after child_environment (secret placeholders)."""
        return {
            name: value
            for name, value in self.attach_env.items()
            if name != "JAIL_ID" and self.base_env.get(name) != value
        }

    def child_command(self, argv: list[str]) -> list[str]:
        assert self.proxy is not None
        spec = parse_run_args(argv)
        self._check_ca_not_mounted(spec)
        labels = {**spec.labels, LABEL: self.jail_id, REMOVE_LABEL: "1" if spec.remove else "0"}
        create: dict[str, Any] = {
            "image": spec.image,
            "command": spec.command or None,
            "name": spec.name or self.names.container,
            "environment": container_environment(
                spec, self.proxy, self.jail_id, self._session_additions(), self.base_env
            ),
            "volumes": [
                *spec.volumes,
                f"{self.proxy.ca_bundle}:{CA_BUNDLE_IN_CONTAINER}:ro",
                f"{self.proxy.ca_cert}:{CA_CERT_IN_CONTAINER}:ro",
            ],
            "network": self.names.network,
            "dns": [self.gateway],
            "labels": labels,
            "stdin_open": spec.interactive,
            "tty": spec.tty,
        }
        optional = {
            "working_dir": spec.workdir,
            "user": spec.user,
            "hostname": spec.hostname,
            "init": spec.init or None,
            "cap_add": spec.cap_add or None,
            "cap_drop": spec.cap_drop or None,
            **{f"{key}_mode": value for key, value in spec.namespaces.items()},
        }
        create.update({key: value for key, value in optional.items() if value is not None})
        if spec.entrypoint is not None:
            create["entrypoint"] = [spec.entrypoint]
        # The spec may hold values of `-e NAME` taken from jail's environment: a root-only file, not argv.
        document = {"create": create, "interactive": spec.interactive, "tty": spec.tty, "remove": spec.remove}
        spec_file = self.names.spec_file
        descriptor = os.open(spec_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            json.dump(document, handle)
        return [sys.executable, "-m", "jail.platform.docker_attach", str(spec_file)]

    def _check_ca_not_mounted(self, spec: RunSpec) -> None:
        """jail's CA key must never reach the container, not even through the user's own `-v`."""
        assert self.proxy is not None
        keys = [os.path.realpath(path) for path in self.proxy.private_files]
        for volume in spec.volumes:
            source = volume.split(":", 1)[0]
            if ":" in volume and source.startswith(("/", ".", "~")):
                path = os.path.realpath(os.path.expanduser(source))
                for key in keys:
                    if key == path or key.startswith(path.rstrip("/") + "/"):
                        raise _refuse(f"-v {volume}", f"it gives the container jail's CA key ({key})")

    async def teardown(self) -> None:
        if self.client is not None:
            await asyncio.to_thread(remove_jail, self.client, self.names)
        else:
            _remove_host_side(self.names)


def _remove_host_side(names: DockerNames) -> None:
    import subprocess

    subprocess.run(["nft", "delete", "table", "inet", names.nft_table], capture_output=True, check=False)
    for path in (names.spec_file, names.pid_file):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove_jail(client: Any, names: DockerNames) -> None:
    """Remove every resource of this jail; each step tolerates what is already gone."""
    import docker

    for container in client.containers.list(all=True, filters={"label": f"{LABEL}={names.jail_id}"}):
        with contextlib.suppress(docker.errors.APIError):
            if container.labels.get(REMOVE_LABEL) == "1":
                container.remove(force=True, v=True)
            elif container.status in ("running", "paused", "restarting", "created"):
                container.kill()  # a container without --rm stays, stopped, as docker run leaves it
    for network in client.networks.list(names=[names.network]):
        if network.name != names.network:
            continue
        with contextlib.suppress(docker.errors.APIError):
            network.reload()
            for container_id in network.attrs.get("Containers") or {}:
                with contextlib.suppress(docker.errors.APIError):
                    network.disconnect(container_id, force=True)
            network.remove()
    _remove_host_side(names)


def existing_jail_ids(client: Any) -> set[str]:
    """Ids of every jail that has a Docker network or container on this daemon."""
    ids = {n.attrs.get("Labels", {}).get(LABEL, "") for n in client.networks.list(filters={"label": LABEL})}
    ids |= {n.name[len("jail-") :] for n in client.networks.list(names=["jail-"]) if n.name.startswith("jail-")}
    ids |= {c.labels.get(LABEL, "") for c in client.containers.list(all=True, filters={"label": LABEL})}
    return {i for i in ids if len(i) == 8 and all(c in "0123456789abcdef" for c in i)}


def cleanup_orphans(client: Any = None) -> list[str]:
    """Remove the Docker resources of jails whose process is gone; never touch a running jail's."""
    if client is None:
        try:
            client = docker_client(timeout=5)
        except JailError:
            return []  # no daemon: nothing of ours can be left there
    removed = []
    for jail_id in sorted(existing_jail_ids(client)):
        if not _jail_alive(jail_id):
            remove_jail(client, DockerNames(jail_id))
            removed.append(jail_id)
    return removed
