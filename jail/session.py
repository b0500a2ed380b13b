"""One jail run: pick the backend, start the proxy, run the child, tear everything down."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from jail.agent import AgentChannel, agent_path, user_agent
from jail.approvals import AskSettings
from jail.audit import AuditSink, RecordSink
from jail.model import JailError, ProxyEndpoint, Request
from jail.platform import (
    Listeners,
    listening_socket,
    make_workdir,
    remove_dirs_of,
    remove_orphan_dirs,
    select_backend,
)
from jail.platform.caches import remove_empty_made_folders
from jail.platform.confine import FsPolicy, command_owner, confine_command, create_missing, unix_socket_syscalls
from jail.platform.process import Child, ChildError
from jail.policies import HostGrant, Judge, RuleSpec, build_engine
from jail.profiles import Profile, home_dir
from jail.proxy.ca import CertificateAuthority, TrustSources
from jail.proxy.clients import ClientTokens
from jail.proxy.secrets import ResponseMasker, Secret
from jail.proxy.upstream import UpstreamProxies, is_proxy_setting

if TYPE_CHECKING:
    from jail.policies.managed import ManagedPolicy
    from jail.workers import WorkerSpec

logger = logging.getLogger("jail")

TIMEOUT_EXIT_STATUS = 124
# The internal first argument that makes `python -m jail` one of the workers of `--server --workers N`.
WORKER_FLAG = "--serve-as-worker"
# A worker that could not start (its reason is told to the parent, which says it).
JAIL_FAILURE_STATUS = 125
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# After SIGTERM or SIGHUP is passed on, the child gets this long before its tree is killed.
SHUTDOWN_GRACE_SECONDS = 5.0


@dataclass
class JailConfig:
    """Every flag, validated; the one object the CLI hands to a session."""

    command: list[str] = field(default_factory=list)
    rule: RuleSpec = field(default_factory=RuleSpec)
    weak: bool = False
    # Without isolation available, run weak rather than refuse.
    allow_weak: bool = False
    timeout: float | None = None
    request_log: Path | None = None
    audit_log: Path | None = None
    log_header_values: bool = False
    # OpenTelemetry export (--otlp-endpoint, or the SDK's OTEL_EXPORTER_OTLP_* variables).
    otlp: bool = False
    otlp_endpoint: str | None = None
    har: Path | None = None
    har_bodies: bool = False
    upstream_ca: Path | None = None
    # `--upstream-proxy URL`; without it, jail's own HTTPS_PROXY / HTTP_PROXY (if any).
    upstream_proxy: str | None = None
    ca_dir: Path | None = None
    test_request: Request | None = None
    server: bool = False
    listen: tuple[str, int] = ("127.0.0.1", 8080)
    # --server: where to write the bound address once the proxy accepts connections.
    ready_file: Path | None = None
    # --server --clients FILE [--require-client]: the names clients prove with proxy authentication.
    clients: ClientTokens | None = None
    # --server --workers N: proxy processes sharing the listening socket (jail/workers.py).
    workers: int = 1
    audit_mode: bool = False
    fail_on_deny: bool = False
    user: str | None = None
    docker_run: bool = False
    allow_private: tuple[str, ...] = ()
    secrets: tuple[Secret, ...] = ()
    # Filesystem confinement of the command (None: none); see jail/platform/confine.py.
    filesystem: FsPolicy | None = None
    # The agent profile (None: none); its folders and files are in `filesystem` already. Its hosts are
    # allowed only when the user named it (--profile): a profile told from the command never widens the rule.
    profile: Profile | None = None
    profile_named: bool = False
    # The administrator's policy (jail/policies/managed.py), asked before the rule; None: there is none.
    managed_policy: Path | None = None
    # (flag, where) for each setting given: "flag", or "FILE:LINE" of a config file (jail/config.py).
    setting_origins: tuple[tuple[str, str], ...] = ()
    # The config files read, and the choices a higher source replaced (said by --explain).
    config_files: tuple[Path, ...] = ()
    config_overrides: tuple[str, ...] = ()
    # Config files looked for and missing: one that appears during the run was made by the command.
    config_absent: tuple[Path, ...] = ()
    # Questions to a person (jail/approvals): --ask, --ask-timeout, --ask-save, --ask-fd.
    ask: AskSettings = field(default_factory=AskSettings)
    # --ui: the live page of the run (jail/approvals/page.py); its address goes to ui_file, else the terminal.
    ui: bool = False
    ui_file: Path | None = None
    # --ssh-agent: the command uses the user's SSH agent through jail (jail/agent).
    ssh_agent: bool = False

    def host_grant(self) -> HostGrant | None:
        profile = self.profile
        if profile is None or not self.profile_named or not profile.hosts:
            return None
        reason = f"a host the {profile.name} agent needs (--profile {profile.name})"
        return HostGrant(f"profile:{profile.name}", reason, frozenset(profile.hosts))


def new_jail_id() -> str:
    return secrets.token_hex(4)


async def start_managed_policy(config: JailConfig, stack: contextlib.AsyncExitStack) -> ManagedPolicy | None:
    if config.managed_policy is None:
        return None
    from jail.policies.managed import ManagedPolicy

    managed = ManagedPolicy(config.managed_policy)
    await managed.start()
    stack.push_async_callback(managed.close)
    return managed


async def check_rule(config: JailConfig) -> int:
    """`--test`: judge one request, print the verdict, exit 0 for allow and 1 for deny."""
    assert config.test_request is not None
    async with contextlib.AsyncExitStack() as stack:
        managed = await start_managed_policy(config, stack)
        engine = build_engine(config.rule)
        await engine.start()
        stack.push_async_callback(engine.close)
        decision = await Judge(engine, grant=config.host_grant(), managed=managed).decide(config.test_request)
    request = config.test_request
    if decision.allow:
        print(f"ALLOW {request.method} {request.url}")
        return 0
    print(f"DENY {request.method} {request.url} ({decision.reason})")
    return 1


class Session:
    """Owns every resource of one run, and releases each of them whatever way the run ends."""

    def __init__(self, config: JailConfig, jail_id: str | None = None) -> None:
        self.config = config
        # A worker of `--server --workers N` is given its parent's: the audit records name one jail.
        self.jail_id = jail_id or new_jail_id()
        self.stack = contextlib.AsyncExitStack()
        self.signals = SignalRelay()
        self.verdicts: Counter[str] = Counter()

    async def run(self) -> int:
        async with self.stack:
            self.signals.install()
            self.stack.callback(self.signals.remove)
            if self.config.server and self.config.workers > 1:
                status = await self._run_workers()
            else:
                await self._start_rule_and_logs()
                status = await (self._run_server() if self.config.server else self._run_child())
        self._warn_of_new_config_files()
        return self._verdict_status(status)

    def _warn_of_new_config_files(self) -> None:
        """A config file made during the run would set the next jail started here: the command may have
        written its own (only existing files can be kept read-only; a missing one cannot be held back)."""
        for path in self.config.config_absent:
            if path.exists():
                print(
                    f"jail: warning: {path} was created during the run; the next jail would read it: check it",
                    file=sys.stderr,
                )

    def _verdict_status(self, status: int) -> int:
        """Audit mode's summary line, and --fail-on-deny's non-zero exit when anything was (or would be) denied."""
        verdicts = self.verdicts
        refused = verdicts["deny"] + verdicts["would_deny"]
        if self.config.audit_mode:
            total = verdicts["allow"] + refused
            print(f"jail: audit: {total} requests, {verdicts['would_deny']} would have been denied", file=sys.stderr)
        if self.config.fail_on_deny and refused and status == 0:
            print(f"jail: {refused} requests were denied or would have been (--fail-on-deny)", file=sys.stderr)
            return 1
        return status

    async def _start_rule_and_logs(self) -> None:
        await self._start_judging(self.jail_id)
        self._make_run_dirs()
        # What the host trusts and which proxy it uses: read from jail's own environment, before the child's is made.
        self.trust = TrustSources.gather(self.config.upstream_ca)
        self.upstream = UpstreamProxies.configure(self.config.upstream_proxy)
        self.ca = CertificateAuthority.ensure(self.config.ca_dir, self.trust)
        if self.config.filesystem is not None:
            # Whoever holds the CA's key can forge certificates for anyone who trusts it.
            self.config.filesystem = self.config.filesystem.denying(self.ca.private_files())

    async def _start_judging(self, questions_id: str) -> None:
        """The managed policy, the rule, the logs and the approvals room (questions named `questions_id`)."""
        self.managed = await start_managed_policy(self.config, self.stack)
        self.engine = build_engine(self.config.rule)
        await self.engine.start()
        self.stack.push_async_callback(self.engine.close)
        self.audit = AuditSink(
            self.jail_id,
            self.config.request_log,
            self.config.audit_log,
            self.config.log_header_values,
            self._record_sinks(),
        )
        self.stack.callback(self.audit.close)
        self.verdicts = self.audit.verdicts
        await self._open_approvals(questions_id)
        await self._open_page()

    def _make_run_dirs(self) -> None:
        remove_orphan_dirs()
        self.workdir = make_workdir(self.jail_id)
        # This one and every other temp dir of the run (the backend's, the command's private temp dir).
        self.stack.callback(remove_dirs_of, self.jail_id)
        # Before the dirs go (callbacks run last-in first): the list of cache folders made for the run is there.
        self.stack.callback(remove_empty_made_folders, self.jail_id)

    async def _open_approvals(self, questions_id: str) -> None:
        """The room where a person answers the rule's questions (jail/approvals); the proxy asks it in
        place of the rule. Opened before the child starts: the save file must exist to be protected."""
        from jail.approvals.room import open_room

        judge = Judge(self.engine, self.config.audit_mode, self.config.host_grant(), self.managed)
        self.approvals = await open_room(
            self.stack, questions_id, judge.decide, self.config.ask, self.audit.record_event
        )

    async def _open_page(self) -> None:
        """--ui: the live page, a record sink like the others but made after the approvals it answers.
        Its --ui-file is made now and denied to the command, which must never read the page's token."""
        if not self.config.ui:
            return
        from jail.approvals.page import LivePage, announce, prepare_ui_file

        ui_file = self.config.ui_file
        if ui_file is not None:
            prepare_ui_file(ui_file)
            self.stack.callback(ui_file.unlink, missing_ok=True)
            if self.config.filesystem is not None:
                self.config.filesystem = self.config.filesystem.denying([ui_file])
        page = LivePage(self.jail_id, self.approvals)
        address = await page.start()
        self.stack.push_async_callback(page.stop)
        self.audit.sinks.append(page)
        announce(address, ui_file)

    def _record_sinks(self) -> list[RecordSink]:
        """The writers of the decision record besides the two logs. The OpenTelemetry SDK is imported
        only when export is asked for: jail's start-up does not pay for it otherwise."""
        config = self.config
        sinks: list[RecordSink] = []
        if config.har is not None:
            from jail.audit.har import HarSink

            mask = ResponseMasker(list(config.secrets)).mask if config.secrets else None
            sinks.append(HarSink(config.har, config.har_bodies, config.log_header_values, mask))
        if config.otlp:
            from jail.audit.otlp import OtlpSink

            profile = config.profile.name if config.profile else None
            sinks.append(OtlpSink(config.otlp_endpoint, profile, config.log_header_values))
        return sinks

    async def _serve(self, listeners: Listeners, isolated: bool) -> None:
        """Serve the backend's sockets: the proxy (started last, it is the slow part) and jail's resolver."""
        from jail.proxy import start_proxy
        from jail.proxy.guard import AddressGuard, networks
        from jail.proxy.secrets import Vault

        names = None
        if listeners.dns is not None:
            from jail.proxy.dns import SyntheticNames, start_resolver

            # Every TCP port goes to jail: a synthetic address per name (the proxy side reads the name
            # back from it).
            names = SyntheticNames()
            transport = await start_resolver(listeners.dns, self.audit.record_dns, names)
            self.stack.callback(transport.close)
        stop = await start_proxy(
            ca=self.ca,
            regular=listeners.regular,
            transparent=listeners.transparent,
            names=names,
            decide=self.approvals.decide,
            audit=self.audit,
            trust=self.trust,
            upstream=self.upstream,
            workdir=self.workdir,
            guard=AddressGuard(isolated, networks(*self.config.allow_private)),
            vault=Vault(self.config.secrets),
            clients=self.config.clients,
        )
        self.stack.push_async_callback(stop)

    def _endpoint(self, listeners: Listeners) -> ProxyEndpoint:
        self.stack.callback(listeners.close)
        host, port, *_ = listeners.regular.getsockname()
        return ProxyEndpoint(host, port, self.ca.trust_cert_path, self.ca.bundle_path, tuple(self.ca.private_files()))

    async def _run_server(self) -> int:
        listeners = Listeners(listening_socket(*self.config.listen))
        endpoint = self._endpoint(listeners)
        await self._serve(listeners, isolated=False)
        self._announce(endpoint)
        await self.signals.stopping.wait()
        return 0

    async def _run_workers(self) -> int:
        """`--server --workers N`: the parent binds the sockets and makes the CA once, then starts N proxy
        processes (jail/workers.py) and says it listens once every one of them accepts."""
        from jail.workers import WorkerPool, WorkerSpec, listening_sockets

        self._make_run_dirs()
        self.ca = CertificateAuthority.ensure(self.config.ca_dir, TrustSources.gather(self.config.upstream_ca))
        # One socket per worker on the same port; each stays open here too, for a worker's replacement.
        sockets = listening_sockets(*self.config.listen, self.config.workers)
        for sock in sockets[1:]:
            self.stack.callback(sock.close)
        endpoint = self._endpoint(Listeners(sockets[0]))
        pool = WorkerPool(
            (sys.executable, "-m", "jail", WORKER_FLAG),
            self.config.workers,
            lambda index: WorkerSpec(
                index, self.jail_id, self.config, self.ca.directory, sockets[index].fileno(), logger.level
            ),
        )
        self.stack.push_async_callback(pool.stop)
        starting = asyncio.create_task(pool.start())
        stopping = asyncio.create_task(self.signals.stopping.wait())
        try:
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():
                return 128 + self.signals.received[0]
            starting.result()
            self._announce(endpoint)
            await asyncio.wait({stopping, pool.failed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            starting.cancel()
            stopping.cancel()
            self.verdicts = pool.verdicts
        if pool.failed.done():
            raise JailError(pool.failed.result())
        return 0

    async def serve_as_worker(self, spec: WorkerSpec, channel: socket.socket) -> int:
        """One of the N proxy processes of `--server --workers N`: its own rule, logs and proxy on the
        socket and CA its parent made; its own work dir (removed by itself, and by the parent at the end)."""
        from jail.workers import parent_gone, tell_parent, worker_signals

        logging.getLogger("jail").setLevel(spec.log_level)
        stopped = asyncio.Event()
        worker_signals(stopped.set)
        async with self.stack:
            try:
                await self._start_judging(f"{self.jail_id}.{spec.index}")
                self.audit.worker_pid = os.getpid()
                self.workdir = make_workdir(self.jail_id)
                self.stack.callback(shutil.rmtree, self.workdir, ignore_errors=True)
                self.trust = TrustSources.gather(self.config.upstream_ca)
                self.upstream = UpstreamProxies.configure(self.config.upstream_proxy)
                self.ca = CertificateAuthority(spec.ca_dir)
                listeners = Listeners(socket.socket(fileno=spec.listen_fd))
                self.stack.callback(listeners.close)
                await self._serve(listeners, isolated=False)
            except JailError as exc:
                tell_parent(channel, error=str(exc))
                return JAIL_FAILURE_STATUS
            tell_parent(channel, ready=os.getpid())
            parent = asyncio.create_task(parent_gone(channel))
            stop = asyncio.create_task(stopped.wait())
            await asyncio.wait({parent, stop}, return_when=asyncio.FIRST_COMPLETED)
            parent.cancel()
            stop.cancel()
        tell_parent(channel, verdicts=dict(self.verdicts))
        return 0

    def _announce(self, endpoint: ProxyEndpoint) -> None:
        print(f"jail: proxy listening on {endpoint.url}; CA certificate: {endpoint.ca_cert}", flush=True)
        # With --listen HOST:0 the port is only known now: said on stderr, and written for scripts.
        print(f"jail: listening on {endpoint.address}", file=sys.stderr, flush=True)
        if self.config.ready_file is not None:
            write_ready_file(self.config.ready_file, endpoint.address)

    async def _run_child(self) -> int:
        backend = select_backend(
            self.jail_id, self.config.weak, self.config.user, self.config.docker_run, self.config.allow_weak
        )
        logger.info("jail %s: %s mode", self.jail_id, backend.name)
        # Teardown is registered first: a half-prepared backend is removed too.
        self.stack.push_async_callback(backend.teardown)
        listeners = await backend.prepare()
        proxy = self._endpoint(listeners)
        # jail's own proxy settings (a corporate proxy) are jail's: the child is pointed at jail. So is the
        # collector jail exports to (OTEL_EXPORTER_OTLP_HEADERS may hold its token).
        own = {
            name: value
            for name, value in os.environ.items()
            if not is_proxy_setting(name) and not (self.config.otlp and name.startswith("OTEL_EXPORTER_OTLP_"))
        }
        env = backend.child_environment(own, proxy)
        # The child holds placeholders only; the real values stay in jail.
        env.update({secret.name: secret.placeholder for secret in self.config.secrets})
        self._make_agent_state(backend)
        policy, channel = self.config.filesystem, self._ssh_agent_channel(backend)
        if channel is not None:
            policy = policy._replace(agent_channel=channel.launcher_end)
            env["SSH_AUTH_SOCK"] = agent_path(self.jail_id)
        pass_fds = (channel.launcher_end,) if channel is not None else ()
        child = Child(confine_command(policy, backend, self.config.command), env, self.jail_id, pass_fds)
        if self.signals.stopping.is_set():
            return 128 + self.signals.received[0]
        try:
            await child.spawn()
        except ChildError as exc:
            print(f"jail: {exc}", file=sys.stderr)
            return exc.status
        self.stack.push_async_callback(child.kill_tree)
        if channel is not None:
            channel.spawned()
            syscalls = unix_socket_syscalls(os.uname().machine)
            answering = asyncio.create_task(
                channel.serve(self.jail_id, user_agent(), self.audit.record_event, syscalls)
            )
            self.stack.push_async_callback(_cancelled, answering)
        # The child runs while the proxy loads: its first requests wait in the sockets' backlog.
        serving = asyncio.create_task(self._serve(listeners, backend.isolated))
        self.stack.push_async_callback(_cancelled, serving)
        return await self._supervise(child, serving)

    def _ssh_agent_channel(self, backend) -> AgentChannel | None:
        """--ssh-agent: the channel the launcher sends its seccomp listener on (None without the flag)."""
        if not self.config.ssh_agent:
            return None
        user_agent()
        policy = self.config.filesystem
        if policy is None or not policy.enabled or backend.name not in ("weak", "strong", "rootless"):
            raise JailError("--ssh-agent needs the filesystem restrictions (weak, strong or rootless mode)")
        if policy.allow_unix_sockets:
            raise JailError("--ssh-agent cannot be combined with --allow-unix-socket")
        channel = AgentChannel()
        self.stack.push_async_callback(channel.close)
        return channel

    def _make_agent_state(self, backend) -> None:
        """The profile's missing folders and home files, made as the user the command runs as."""
        policy, profile = self.config.filesystem, self.config.profile
        if profile is None or policy is None or not policy.enabled or policy.read_only:
            return
        if backend.name not in ("weak", "strong", "rootless"):  # docker: no filesystem confinement
            return
        home = home_dir()
        create_missing(
            profile.folders(home, dict(os.environ)), profile.home_files(home, dict(os.environ)), command_owner(backend)
        )

    async def _supervise(self, child: Child, serving: asyncio.Task[None]) -> int:
        self.signals.child = child
        exited = asyncio.create_task(child.wait())
        deadline = asyncio.create_task(asyncio.sleep(self.config.timeout)) if self.config.timeout else None
        stopping = asyncio.create_task(self.signals.stopping.wait())
        waiters = {exited, stopping} | ({deadline} if deadline else set())
        try:
            await asyncio.wait(waiters | {serving}, return_when=asyncio.FIRST_COMPLETED)
            if serving.done() and serving.exception() is not None and not exited.done():
                # The proxy could not start: the child must not run on, unserved.
                await child.kill_tree()
                raise serving.exception()
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            if stopping.done() and not exited.done():
                await asyncio.wait({exited}, timeout=SHUTDOWN_GRACE_SECONDS)
            if exited.done():
                return exited.result()
            if deadline is not None and deadline.done():
                logger.info("--timeout of %gs reached, killing the command", self.config.timeout)
                await child.kill_tree()
                return TIMEOUT_EXIT_STATUS
            await child.kill_tree()
            return await exited
        finally:
            for waiter in waiters:
                waiter.cancel()


def serve_as_worker(channel_fd: int) -> int:
    """The entry point of a worker process (`python -m jail WORKER_FLAG FD`, jail/workers.py)."""
    from jail.workers import receive_spec

    channel = socket.socket(fileno=channel_fd)
    spec = receive_spec(channel)
    return asyncio.run(Session(spec.config, spec.jail_id).serve_as_worker(spec, channel))


def write_ready_file(path: Path, address: str) -> None:
    """Atomically, so a script polling for the file never reads half an address."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        partial.write_text(address + "\n")
        partial.replace(path)
    except OSError as exc:
        raise JailError(f"--ready-file: cannot write {path}: {exc.strerror}") from None


async def _cancelled(task: asyncio.Task[None]) -> None:
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    except Exception as exc:  # the child has exited already; its status stands, the failure is still said
        print(f"jail: {exc}", file=sys.stderr)


class SignalRelay:
    """Ctrl-C, SIGTERM and SIGHUP go to the child; SIGTERM and SIGHUP also end the run.

    Installed before anything starts, so a signal that comes early still ends in a clean teardown.
    """

    def __init__(self) -> None:
        self.child: Child | None = None
        self.received: list[int] = []
        self.stopping = asyncio.Event()

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in FORWARDED_SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)

    def remove(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in FORWARDED_SIGNALS:
            loop.remove_signal_handler(sig)

    def _on_signal(self, sig: int) -> None:
        self.received.append(sig)
        if self.child is not None:
            self.child.send(sig)
        # An interactive child may handle Ctrl-C and go on; without a child, Ctrl-C means stop.
        if sig != signal.SIGINT or self.child is None:
            self.stopping.set()
