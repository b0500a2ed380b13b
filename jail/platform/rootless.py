"""Rootless strong isolation: a user namespace of the caller's own, with a network namespace that has
only loopback.

    jail ◄──(SCM_RIGHTS)── holder: unshare -Ur -n -m, root of the new user namespace
      │                      lo up, every route to lo, nftables: 80/443 → transparent socket, DNS → 53
      └─ child: nsenter into the holder's namespaces → a nested user namespace mapping the caller's
                uid (so it has no capability over the network) → setpriv → the command

The holder binds the proxy's and the resolver's sockets inside the namespace and passes them to jail,
which serves them from outside: the namespace has no link to anything, so the only way out is through
jail. Nothing is created on the host, so a killed jail leaves nothing behind: the kernel frees the
namespaces with their last process and socket.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from jail.model import JailError, ProxyEndpoint
from jail.platform import Listeners

HOLDER = Path(__file__).with_name("rootless_holder.py")
TOOLS = {"unshare": "util-linux", "nsenter": "util-linux", "setpriv": "util-linux", "nft": "nftables", "ip": "iproute2"}
TOOL_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Every name resolves here (a benchmarking range no one routes); connections to it on 80/443 are the proxy's.
SINKHOLE = "198.18.0.1"
JAIL_HOSTS_FILE = "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n"
HOLDER_START_SECONDS = 10.0
# /proc/sys switches that turn unprivileged user namespaces off, and the value that means off.
USERNS_SWITCHES = {
    "/proc/sys/user/max_user_namespaces": "0",
    "/proc/sys/kernel/unprivileged_userns_clone": "0",
    "/proc/sys/kernel/apparmor_restrict_unprivileged_userns": "1",
}


def rootless_unavailable() -> str | None:
    """Why an unprivileged user namespace cannot be the jail here, or None."""
    if sys.platform != "linux":
        return f"no user namespaces on {sys.platform}"
    for switch, off in USERNS_SWITCHES.items():
        try:
            if Path(switch).read_text().strip() == off:
                return f"unprivileged user namespaces are disabled ({switch} is {off})"
        except OSError:
            continue
    for tool, package in TOOLS.items():
        if shutil.which(tool, path=TOOL_PATH) is None:
            return f"the {tool!r} command is missing (install the {package} package)"
    return None


class RootlessBackend:
    name = "rootless"
    isolated = True

    def __init__(self, jail_id: str) -> None:
        self.jail_id = jail_id
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
                    _tool("unshare"),
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
                    f"jail_{self.jail_id}",
                    str(resolv_conf),
                    str(hosts),
                ],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        try:
            message, fds = await asyncio.wait_for(asyncio.to_thread(self._receive), HOLDER_START_SECONDS)
        except TimeoutError:
            raise JailError("the rootless jail's namespace did not come up in time") from None
        if message.get("error") or len(fds) != 3:
            for fd in fds:
                os.close(fd)
            raise JailError(f"cannot build the rootless jail: {message.get('error') or self._holder_failure()}")
        regular, transparent, dns = (socket.socket(fileno=fd) for fd in fds)
        return Listeners(regular, transparent, dns, sinkhole=SINKHOLE)

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
            _tool("nsenter"),
            f"--target={self.holder.pid}",
            "--user",
            "--net",
            "--mount",
            # No setgroups: the namespace forbids it (an unprivileged user namespace must).
            "--preserve-credentials",
            # Entering a mount namespace moves to its root: come back to where jail was started.
            f"--wd={os.getcwd()}",
            "--",
            # A second user namespace in which the command is the caller's uid: it keeps the caller's
            # files, and has no capability over the first namespace's network or firewall.
            _tool("unshare"),
            "--user",
            f"--map-user={os.getuid()}",
            f"--map-group={os.getgid()}",
            "--",
            _tool("setpriv"),
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


def _tool(name: str) -> str:
    return shutil.which(name, path=TOOL_PATH) or name
