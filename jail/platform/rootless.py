"""Rootless strong isolation: a user namespace of the caller's own, with a network namespace that has
only loopback.

    jail ◄──(SCM_RIGHTS)── holder: unshare -Ur -n -m, root of the new user namespace
      │                      lo up, every route to lo, nftables: TCP (any port) → transparent socket, DNS → 53
      └─ child: nsenter into the holder's namespaces → a nested user namespace mapping the caller's
                uid (so it has no capability over the network) → setpriv → the command

The holder binds the proxy's and the resolver's sockets inside the namespace and passes them to jail,
which serves them from outside: the namespace has no link to anything, so the only way out is through
jail. Nothing is created on the host, so a killed jail leaves nothing behind: the kernel frees the
namespaces with their last process and socket.

Without nftables (no `nft` command, or no nf_tables in the kernel) the same namespace is the jail
without a firewall ("namespace" mode, for root and users alike): no route but loopback and no
redirect, so the proxy variables are the only way out and a program that ignores them reaches
nothing (its connections fail at once) rather than being judged.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from jail.model import JailError, ProxyEndpoint
from jail.platform import Listeners, system_tool, tool_path

HOLDER = Path(__file__).with_name("rootless_holder.py")
TOOLS = ("unshare", "nsenter", "setpriv")
JAIL_HOSTS_FILE = "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n"
HOLDER_START_SECONDS = 10.0
NFT_PROBE_SECONDS = 5.0
# /proc/sys switches that turn unprivileged user namespaces off, and the value that means off.
MAX_USER_NAMESPACES = "/proc/sys/user/max_user_namespaces"
APPARMOR_RESTRICTION = "/proc/sys/kernel/apparmor_restrict_unprivileged_userns"
USERNS_SWITCHES = {
    MAX_USER_NAMESPACES: "0",
    "/proc/sys/kernel/unprivileged_userns_clone": "0",
    APPARMOR_RESTRICTION: "1",
}


def rootless_unavailable() -> str | None:
    """Why a user namespace of the caller's cannot be the jail here, or None."""
    if sys.platform != "linux":
        return f"no user namespaces on {sys.platform}"
    for switch, off in USERNS_SWITCHES.items():
        # The other switches hold back unprivileged users only.
        if os.geteuid() == 0 and switch != MAX_USER_NAMESPACES:
            continue
        try:
            if Path(switch).read_text().strip() != off:
                continue
        except OSError:
            continue
        # AppArmor's restriction is lifted per program by a profile (Ubuntu 24.04): only trying tells.
        if switch != APPARMOR_RESTRICTION or not _unshare_is_capable():
            return f"unprivileged user namespaces are disabled ({switch} is {off})"
    for tool in TOOLS:
        if system_tool(tool) is None:
            return f"the {tool!r} command is missing (install the util-linux package)"
    return None


@functools.cache
def _unshare_is_capable() -> bool:
    """Whether `unshare` makes a user namespace in which its root may act (mount, as the holder must):
    under AppArmor's restriction the namespace is made, but without any capability, unless a profile
    allows `userns` for unshare."""
    unshare = system_tool("unshare")
    mount = system_tool("mount")
    if unshare is None or mount is None:
        return False
    probe = [unshare, "--user", "--map-root-user", "--net", "--mount", "--", mount, "-t", "tmpfs", "jail-probe", "/"]
    try:
        return subprocess.run(probe, capture_output=True, timeout=NFT_PROBE_SECONDS, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@functools.cache
def nftables_unavailable() -> str | None:
    """Why no nftables table can be installed in a namespace of jail's, or None.

    Only trying tells whether the kernel has nf_tables (it may be missing, or blocked in a container):
    `nft list tables` in a fresh network namespace, a user namespace's when not root (~3 ms)."""
    nft = system_tool("nft")
    if nft is None:
        return "the 'nft' command is missing"
    as_user = ["--user", "--map-root-user"] if os.geteuid() != 0 else []
    try:
        probe = subprocess.run(
            [tool_path("unshare"), *as_user, "--net", nft, "list", "tables"],
            capture_output=True,
            text=True,
            timeout=NFT_PROBE_SECONDS,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nftables does not work here: {exc}"
    if probe.returncode != 0:
        said = probe.stderr.strip().splitlines()
        return f"nftables does not work here: {said[0] if said else f'nft exited with {probe.returncode}'}"
    return None


class RootlessBackend:
    """The rootless jail; without a firewall (`firewall=False`) the namespace mode's.

    Both are named "rootless": the filesystem launcher takes its place in the child's command line the
    same way in both."""

    name = "rootless"
    isolated = True

    def __init__(self, jail_id: str, firewall: bool = True) -> None:
        self.jail_id = jail_id
        self.firewall = firewall
        self.holder: subprocess.Popen[bytes] | None = None
        self.control: socket.socket | None = None
        self.workdir: Path | None = None

    async def prepare(self) -> Listeners:
        self.workdir = Path(tempfile.mkdtemp(prefix=f"jail-{self.jail_id}-ns-"))
        resolv_conf = self.workdir / "resolv.conf"
        resolv_conf.write_text("nameserver 127.0.0.1\n")
        hosts = self.workdir / "hosts"
        hosts.write_text(JAIL_HOSTS_FILE)
        self.workdir.chmod(0o755)
        self.control, theirs = socket.socketpair()
        with theirs:
            self.holder = subprocess.Popen(
                [
                    tool_path("unshare"),
                    "--user",
                    "--map-root-user",
                    "--net",
                    "--mount",
                    "--",
                    sys.executable,
                    "-I",
                    "-S",
                    str(HOLDER),
                    str(theirs.fileno()),
                    str(resolv_conf),
                    str(hosts),
                    *([f"jail_{self.jail_id}"] if self.firewall else []),
                ],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        try:
            message, fds = await asyncio.wait_for(asyncio.to_thread(self._receive), HOLDER_START_SECONDS)
        except TimeoutError:
            raise JailError("the rootless jail's namespace did not come up in time") from None
        expected = 3 if self.firewall else 2
        if message.get("error") or len(fds) != expected:
            for fd in fds:
                os.close(fd)
            raise JailError(f"cannot build the rootless jail: {message.get('error') or self._holder_failure()}")
        sockets = [socket.socket(fileno=fd) for fd in fds]
        transparent = sockets[1] if self.firewall else None
        # Each name gets a synthetic address (jail.proxy.dns); without a redirect, nothing routes to it.
        return Listeners(sockets[0], transparent, sockets[-1])

    def _receive(self) -> tuple[dict[str, str], list[int]]:
        assert self.control is not None
        data, fds, _, _ = socket.recv_fds(self.control, 4096, 3)
        try:
            return (json.loads(data) if data else {}), fds
        except ValueError:
            return {"error": data.decode(errors="replace")}, fds

    def _holder_failure(self) -> str:
        assert self.holder is not None
        try:
            _, stderr = self.holder.communicate(timeout=2)
        except subprocess.TimeoutExpired:
            return "its namespace holder stopped answering"
        text = (stderr or b"").decode(errors="replace").strip().splitlines()
        return text[-1] if text else f"unshare exited with {self.holder.returncode}"

    def child_environment(self, base: dict[str, str], proxy: ProxyEndpoint) -> dict[str, str]:
        from jail.platform.weak import proxy_environment

        return proxy_environment(base, proxy, self.jail_id)

    def child_command(self, argv: list[str]) -> list[str]:
        assert self.holder is not None
        return [
            tool_path("nsenter"),
            f"--target={self.holder.pid}",
            "--user",
            "--net",
            "--mount",
            # No setgroups: the namespace forbids it (an unprivileged user namespace must).
            "--preserve-credentials",
            "--",
            # A second user namespace in which the command is the caller's uid: it keeps the caller's
            # files, and has no capability over the first namespace's network or firewall.
            tool_path("unshare"),
            "--user",
            f"--map-user={os.getuid()}",
            f"--map-group={os.getgid()}",
            # Entering a mount namespace moves to its root: come back to where jail was started, by
            # path inside the namespace (nsenter's --wd keeps a directory of the host's mount namespace,
            # which getcwd() then reports as "(unreachable)/...", and musl programs fail on).
            f"--wd={os.getcwd()}",
            "--",
            tool_path("setpriv"),
            "--no-new-privs",
            "--pdeathsig=KILL",
            "--",
            *argv,
        ]

    async def teardown(self) -> None:
        if self.control is not None:
            self.control.close()  # the holder's cue to exit
        if self.holder is not None:
            try:
                await asyncio.to_thread(self.holder.wait, 2)
            except subprocess.TimeoutExpired:
                self.holder.kill()
                await asyncio.to_thread(self.holder.wait)
            if self.holder.stderr is not None:
                self.holder.stderr.close()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
