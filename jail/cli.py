"""`jail [OPTIONS] -- CMD [ARGS...]`: flags become one JailConfig; bad input becomes one line on stderr."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

import click

from jail import __version__
from jail.approvals import AskSettings
from jail.config import PROJECT_FILE, ConfigLayers, ConfiguredCommand, origins
from jail.model import JailError, Request
from jail.policies import RuleSpec, rule_files
from jail.policies.managed import find_managed_policy
from jail.profiles import Profile, detect, home_dir, load
from jail.proxy.clients import ClientTokens
from jail.proxy.secrets import Secret, hide_from_children, parse_secret_spec
from jail.session import WORKER_FLAG, JailConfig, Session, check_rule

USAGE_EXIT_STATUS = 2
# Like timeout(1) and docker run: jail's own failure is told apart from the command's exit codes.
JAIL_FAILURE_EXIT_STATUS = 125
HTTP_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"}


def split_test_option(argv: list[str]) -> list[str]:
    """`--test [METHOD] URL` takes one or two values, which click cannot say; rewrite it first."""
    out: list[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        if token == "--":
            return out + argv[index:]
        if token == "--test":
            values = argv[index + 1 : index + 3]
            if values and values[0].upper() in HTTP_METHODS and len(values) == 2:
                out += ["--test-method", values[0].upper(), "--test-url", values[1]]
                index += 3
                continue
            if not values or values[0].startswith("-"):
                raise click.UsageError("--test needs a URL: --test [METHOD] URL")
            # httpjail's tests and users also write the method and the URL as one argument.
            method, _, url = values[0].strip().partition(" ")
            if url and method.upper() in HTTP_METHODS:
                out += ["--test-method", method.upper(), "--test-url", url.strip()]
            else:
                out += ["--test-url", values[0]]
            index += 2
            continue
        out.append(token)
        index += 1
    return out


def parse_listen(value: str, public: bool) -> tuple[str, int]:
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise click.BadParameter(f"{value!r} is not HOST:PORT", param_hint="--listen")
    if not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise click.BadParameter(f"bad port {port_text!r} (0-65535; 0 picks a free one)", param_hint="--listen")
    host = host.strip("[]")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and not public:
        raise click.BadParameter(
            f"{host} is not a loopback address; add --listen-public to expose the proxy", param_hint="--listen"
        )
    return host, int(port_text)


def parse_secrets(specs: tuple[str, ...], files: tuple[str, ...]) -> tuple[Secret, ...]:
    paths = {}
    for item in files:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"{item!r} is not NAME=PATH", param_hint="--secret-file")
        paths[name] = path
    parsed = tuple(parse_secret_spec(spec, dict(os.environ), paths) for spec in specs)
    hide_from_children(parsed)
    return parsed


def parse_cidr(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not an address range (e.g. 10.1.2.0/24)", param_hint="--allow-private"
        ) from None


def filesystem_policy(
    allow_write: tuple[str, ...],
    read_only: bool,
    deny_read: tuple[str, ...],
    protect: tuple[str, ...],
    allow_unix_socket: tuple[str, ...],
    no_fs_restrictions: bool,
    keep_caches: bool = False,
    profile: Profile | None = None,
    rule_files: tuple[Path, ...] = (),
):
    """The command's filesystem policy (None with --no-fs-restrictions): the agent profile's folders and
    home files open too; the files the rule is read from stay read-only wherever they lie."""
    if no_fs_restrictions:
        return None
    if read_only and allow_write:
        raise click.UsageError("--read-only and --allow-write contradict each other")
    if read_only and keep_caches:
        raise click.UsageError("--read-only and --keep-caches contradict each other")
    from jail.platform.caches import find_caches
    from jail.platform.confine import build_policy, home_dirs

    home, environ = home_dir(), dict(os.environ)
    policy = build_policy(
        allow_write,
        read_only,
        deny_read,
        (*protect, *map(str, rule_files)),
        allow_unix_socket,
        also_write=tuple(profile.folders(home, environ)) if profile else (),
        home_files=tuple(profile.home_files(home, environ)) if profile else (),
    )
    # The package managers' caches, copy-on-write (written through with --keep-caches): jail/platform/caches.py.
    caches = find_caches(home_dirs(), dict(os.environ), avoid=(*policy.write_roots, *policy.deny_read))
    return policy._replace(caches=caches, keep_caches=keep_caches)


def ask_settings(
    ask_denials: bool,
    timeout: float,
    ask_save: Path | None,
    fd: str | None,
    policy_files: tuple[Path, ...],
    audit_mode: bool,
) -> AskSettings:
    """--ask and its company. "Always" answers go to a file only when the user named one (--ask-save,
    --policy) or asked for questions (--ask): that file is protected from the command from the start."""
    from jail.approvals.saved import save_path

    if timeout <= 0:
        raise click.BadParameter("must be positive", param_hint="--ask-timeout")
    if ask_denials and audit_mode:
        raise click.UsageError("--ask and --audit contradict each other (--audit lets every request through)")
    if fd is not None:
        from jail.approvals.channels import parse_fds

        parse_fds(fd)
    saving = ask_denials or ask_save is not None or bool(policy_files)
    save_to = save_path(ask_save, policy_files) if saving else None
    return AskSettings(ask_denials, timeout, save_to, fd)


def worker_count(value: str | None, config: JailConfig) -> int:
    """--workers N|auto; more than one refuses what lives in one process (a page, one fd, one HAR file)."""
    if value is None:
        return 1
    if value == "auto":
        from jail.workers import cores

        count = cores()
    elif value.isdigit() and int(value) >= 1:
        count = int(value)
    else:
        raise click.BadParameter(
            f"expected a number of processes (1 or more) or auto, not {value!r}", param_hint="--workers"
        )
    one_process = (
        ("--ask", config.ask.ask_denials),
        ("--ask-fd", config.ask.fd),
        ("--ui", config.ui),
        ("--har", config.har),
    )
    if count > 1 and (given := [name for name, value in one_process if value]):
        raise click.UsageError(f"{given[0]} works with one proxy process, not --workers {value}")
    return count


def client_tokens(path: Path | None, required: bool) -> ClientTokens | None:
    """--clients FILE and --require-client (jail/proxy/clients.py)."""
    if path is None:
        if required:
            raise click.UsageError("--require-client needs --clients FILE (the names and their tokens)")
        return None
    return ClientTokens.load(path, required)


def choose_profile(name: str | None, no_profile: bool, command: tuple[str, ...]) -> Profile | None:
    """--profile NAME, none with --no-profile, else the profile of the agent the command runs (if any)."""
    if name is not None and no_profile:
        raise click.UsageError("--profile and --no-profile contradict each other")
    if name is not None:
        return load(name)
    return None if no_profile else detect(list(command))


def rule_spec(
    js: str | None,
    js_file: str | None,
    sh: str | None,
    proc: str | None,
    policy_files: tuple[Path, ...],
    timeout: float | None,
) -> RuleSpec:
    policies = "policy" if policy_files else None
    candidates = (("js", js), ("js_file", js_file), ("sh", sh), ("proc", proc), ("policy", policies))
    for kind, value in candidates:
        if value is not None and not value:
            raise click.BadParameter("must not be empty", param_hint="--" + kind.replace("_", "-"))
    given = [(kind, value) for kind, value in candidates if value]
    if len(given) > 1:
        names = ", ".join("--" + kind.replace("_", "-") for kind, _ in given)
        raise click.UsageError(f"give exactly one rule, not {names}")
    if timeout is not None and timeout <= 0:
        raise click.BadParameter("must be positive", param_hint="--rule-timeout")
    if not given:
        return RuleSpec(timeout=timeout)
    kind, source = given[0]
    return RuleSpec(kind, source, timeout, files=policy_files)  # type: ignore[arg-type]


# The OpenTelemetry SDK's own variables: any of them turns export on without --otlp-endpoint.
OTLP_ENDPOINT_VARIABLES = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
)


def configure_logging(verbosity: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("jail: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("jail").setLevel([logging.WARNING, logging.INFO, logging.DEBUG][min(verbosity, 2)])
    # mitmproxy's own connection chatter only at -vv.
    logging.getLogger("mitmproxy").setLevel(logging.INFO if verbosity >= 2 else logging.WARNING)


EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.command(
    cls=ConfiguredCommand,
    context_settings={"allow_interspersed_args": False, "help_option_names": ["-h", "--help"]},
)
@click.option(
    "--config",
    type=click.Path(dir_okay=False),
    expose_value=False,
    help=f"Project config file (default: ./{PROJECT_FILE}); flags win over it, it wins over ~/.config/jail/config.toml.",
)
@click.option("--no-config", is_flag=True, expose_value=False, help="Read no config file (the managed policy stays).")
@click.option("--js", metavar="CODE", help="JavaScript rule; the request is `r`.")
@click.option("--js-file", type=EXISTING_FILE, help="JavaScript rule from a file (reloaded on change).")
@click.option("--sh", metavar="SCRIPT", help="Shell rule, run per request; exit 0 allows.")
@click.option("--proc", metavar="PROG", help="Long-lived rule program: JSON lines in, answers out.")
@click.option(
    "--policy", "policy_files", type=EXISTING_FILE, multiple=True, help="Policy file (TOML); repeat to append rules."
)
@click.option("--audit", "audit_mode", is_flag=True, help="Allow everything; record what the rule would have denied.")
@click.option("--fail-on-deny", is_flag=True, help="Exit non-zero if any request was (or would have been) denied.")
@click.option("--rule-timeout", type=float, metavar="S", help="Per-request rule timeout (JS 0.1 s, others 5 s).")
@click.option("--weak", is_flag=True, help="Environment variables only (no OS isolation).")
@click.option("--allow-weak", is_flag=True, help="Fall back to --weak when the OS cannot isolate the command.")
@click.option("--docker-run", is_flag=True, help="The command is `docker run` arguments: jail a container.")
@click.option("--user", metavar="NAME", help="Run the command as this user (strong mode; default: $SUDO_UID).")
@click.option("--cleanup", is_flag=True, help="Remove what killed jails left behind (namespaces, links, nft tables).")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    metavar="S",
    help="Kill the command after S seconds (exit 124).",
)
@click.option(
    "--request-log", type=click.Path(dir_okay=False, path_type=Path), help="Append `TIME +|- METHOD URL` lines."
)
@click.option(
    "--audit-log", type=click.Path(dir_okay=False, path_type=Path), help="Append one JSON object per request."
)
@click.option("--log-header-values", is_flag=True, help="Put header values (not only names) in the audit log.")
@click.option(
    "--otlp-endpoint",
    metavar="URL",
    help="Export each decision to this OpenTelemetry collector (OTLP/HTTP; default: $OTEL_EXPORTER_OTLP_ENDPOINT).",
)
@click.option(
    "--har", "har_file", type=click.Path(dir_okay=False, path_type=Path), help="Write the run as a HAR 1.2 file."
)
@click.option("--har-bodies", is_flag=True, help="With --har: also the bodies (secrets masked).")
@click.option(
    "--secret",
    "secret_specs",
    multiple=True,
    metavar="NAME=HOST[,HOST]",
    help="Child gets a placeholder for $NAME; the proxy swaps in the real value for these hosts only.",
)
@click.option(
    "--secret-file",
    "secret_files",
    multiple=True,
    metavar="NAME=PATH",
    help="Read secret NAME's value from PATH instead of jail's environment.",
)
@click.option("--allow-private", multiple=True, metavar="CIDR", help="Let the proxy reach this private/loopback range.")
@click.option("--upstream-ca", type=EXISTING_FILE, help="Also trust this CA for upstream servers.")
@click.option(
    "--upstream-proxy",
    metavar="URL",
    help="Send allowed requests through this http:// proxy (default: jail's own HTTPS_PROXY/HTTP_PROXY).",
)
# Filesystem confinement (jail/platform/confine.py).
@click.option("--allow-write", multiple=True, metavar="PATH", help="Writable folder (default: the current one).")
@click.option("--read-only", is_flag=True, help="No writes at all but to a private temp dir ($TMPDIR).")
@click.option("--deny-read", multiple=True, metavar="PATH", help="Also unreadable (added to ~/.ssh, ~/.aws, ...).")
@click.option("--protect", multiple=True, metavar="PATH", help="Read-only even inside a writable folder.")
@click.option("--allow-unix-socket", multiple=True, metavar="PATH", help="Allow Unix sockets (see README).")
@click.option(
    "--ssh-agent", is_flag=True, help="The command may use (not read) the keys of your SSH agent, relayed by jail."
)
@click.option(
    "--keep-caches",
    is_flag=True,
    help="Package caches (~/.npm, ~/.cache, ...) written through, not copy-on-write: what the command puts there stays.",
)
@click.option("--no-fs-restrictions", is_flag=True, help="No filesystem restrictions at all.")
@click.option(
    "--profile",
    "profile_name",
    metavar="NAME",
    help="Agent profile (codex, claude, gemini, opencode, aider): its state writable, its hosts allowed.",
)
@click.option("--no-profile", is_flag=True, help="No agent profile, even for a command that has one.")
@click.option("--ask", "ask_denials", is_flag=True, help="Ask a person (jail ask) instead of denying by the rule.")
@click.option(
    "--ask-timeout", type=float, default=60.0, metavar="S", help="Deny a question nobody answered in S s (60)."
)
@click.option("--ask-save", type=click.Path(dir_okay=False, path_type=Path), help="Append 'always' answers here.")
@click.option("--ask-fd", metavar="N|R,W", help="Questions and answers as JSON lines on inherited fds.")
@click.option("--ui", is_flag=True, help="Serve a live page of the run (requests, questions, totals) on loopback.")
@click.option(
    "--ui-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="With --ui: write the page's address (it holds a secret token) to this new file, not to the terminal.",
)
@click.option("--test", "test_flag", is_flag=True, hidden=True)
@click.option("--test-url", hidden=True)
@click.option("--test-method", hidden=True, default="GET")
@click.option("--explain", is_flag=True, help="Say what the jail would allow and restrict, without running anything.")
@click.option("--server", is_flag=True, help="Run only the proxy (127.0.0.1:8080 unless --listen).")
@click.option("--listen", metavar="HOST:PORT", help="Address for --server.")
@click.option("--listen-public", is_flag=True, help="Allow --listen on a non-loopback address.")
@click.option(
    "--ready-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="With --server: write HOST:PORT here once the proxy accepts connections.",
)
@click.option(
    "--clients",
    "clients_file",
    type=EXISTING_FILE,
    help="With --server: `NAME TOKEN` lines; a client names itself as http://NAME:TOKEN@host:port (r.client).",
)
@click.option("--require-client", is_flag=True, help="With --clients: 407 for a client without a name and token.")
@click.option(
    "--workers",
    metavar="N|auto",
    help="With --server: N proxy processes sharing the port (default 1; auto: one per core).",
)
@click.option("-v", "--verbose", count=True, help="Diagnostics on stderr (-vv for more).")
@click.version_option(__version__, prog_name="jail")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def main(
    js: str | None,
    js_file: Path | None,
    sh: str | None,
    proc: str | None,
    policy_files: tuple[Path, ...],
    audit_mode: bool,
    fail_on_deny: bool,
    rule_timeout: float | None,
    weak: bool,
    allow_weak: bool,
    docker_run: bool,
    user: str | None,
    cleanup: bool,
    timeout: float | None,
    request_log: Path | None,
    audit_log: Path | None,
    log_header_values: bool,
    otlp_endpoint: str | None,
    har_file: Path | None,
    har_bodies: bool,
    secret_specs: tuple[str, ...],
    secret_files: tuple[str, ...],
    allow_private: tuple[str, ...],
    upstream_ca: Path | None,
    upstream_proxy: str | None,
    allow_write: tuple[str, ...],
    read_only: bool,
    deny_read: tuple[str, ...],
    protect: tuple[str, ...],
    allow_unix_socket: tuple[str, ...],
    ssh_agent: bool,
    no_fs_restrictions: bool,
    keep_caches: bool,
    profile_name: str | None,
    no_profile: bool,
    ask_denials: bool,
    ask_timeout: float,
    ask_save: Path | None,
    ask_fd: str | None,
    ui: bool,
    ui_file: Path | None,
    test_flag: bool,
    test_url: str | None,
    test_method: str,
    explain: bool,
    server: bool,
    listen: str | None,
    listen_public: bool,
    ready_file: Path | None,
    clients_file: Path | None,
    require_client: bool,
    workers: str | None,
    verbose: int,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND with every HTTP(S) request judged by a rule.

    \b
      jail --js "r.host === 'api.openai.com'" -- codex
      jail --sh 'test "$JAIL_METHOD" = GET' -- curl https://example.com
      jail --js "r.method === 'GET'" --test POST https://example.com

    --test [METHOD] URL judges one request and exits 0 (allow) or 1 (deny).
    """
    configure_logging(verbose)
    if cleanup:
        from jail.platform import cleanup_orphans

        removed = cleanup_orphans()
        print(f"jail: removed {len(removed)} orphaned jail(s){': ' + ' '.join(removed) if removed else ''}")
        sys.exit(0)
    context = click.get_current_context()
    layers: ConfigLayers = context.meta.get("jail.config", ConfigLayers())
    managed_policy = find_managed_policy(os.environ)
    spec = rule_spec(js, str(js_file) if js_file else None, sh, proc, policy_files, rule_timeout)
    profile = choose_profile(profile_name, no_profile, command)
    ask = ask_settings(ask_denials, ask_timeout, ask_save, ask_fd, policy_files, audit_mode)
    if har_bodies and har_file is None:
        raise click.UsageError("--har-bodies needs --har FILE")
    config = JailConfig(
        command=list(command),
        rule=spec,
        weak=weak,
        allow_weak=allow_weak,
        timeout=timeout,
        request_log=request_log,
        audit_log=audit_log,
        log_header_values=log_header_values,
        otlp=bool(otlp_endpoint) or any(os.environ.get(name) for name in OTLP_ENDPOINT_VARIABLES),
        otlp_endpoint=otlp_endpoint,
        har=har_file,
        har_bodies=har_bodies,
        upstream_ca=upstream_ca,
        upstream_proxy=upstream_proxy,
        server=server,
        clients=client_tokens(clients_file, require_client),
        audit_mode=audit_mode,
        fail_on_deny=fail_on_deny,
        user=user,
        docker_run=docker_run,
        allow_private=tuple(parse_cidr(value) for value in allow_private),
        filesystem=filesystem_policy(
            allow_write,
            read_only,
            deny_read,
            protect,
            allow_unix_socket,
            no_fs_restrictions,
            keep_caches,
            profile,
            # The config files too: a command that rewrote them would set its own next jail.
            (*rule_files(spec), *layers.files, *([ask.save_to] if ask.save_to else [])),
        ),
        ask=ask,
        ui=ui,
        ui_file=ui_file,
        ssh_agent=ssh_agent,
        profile=profile,
        profile_named=profile_name is not None,
        secrets=parse_secrets(secret_specs, secret_files),
        managed_policy=managed_policy,
        setting_origins=origins(context, layers),
        config_files=layers.files,
        config_overrides=tuple(layers.overridden),
        config_absent=layers.absent,
    )
    if ui_file is not None and not ui:
        raise click.UsageError("--ui-file goes with --ui")
    if ui_file is not None and config.filesystem is None:
        raise click.UsageError("--ui-file needs the filesystem restrictions: the command could read the page's token")
    # Checked before --explain, which then says what this server would be.
    if server:
        if command:
            raise click.UsageError("--server takes no command")
        if secret_specs:
            raise click.UsageError("--secret needs a command to hand the placeholder to (not --server)")
        config.listen = parse_listen(listen or "127.0.0.1:8080", listen_public)
        config.ready_file = ready_file
        config.workers = worker_count(workers, config)
    else:
        server_only = (
            ("--listen", listen),
            ("--ready-file", ready_file),
            ("--clients", clients_file),
            ("--workers", workers),
        )
        if given := [name for name, value in (*server_only, ("--require-client", require_client)) if value]:
            raise click.UsageError(f"{given[0]} only goes with --server")
    if explain:
        from jail.explain import explain as explain_text

        click.echo(explain_text(config))
        sys.exit(0)
    if test_url is not None:
        try:
            config.test_request = Request.from_url(test_url, test_method)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--test") from None
        if command:
            raise click.UsageError("--test takes no command")
        sys.exit(asyncio.run(check_rule(config)))
    if not server and not command:
        raise click.UsageError("no command given: jail [OPTIONS] -- COMMAND [ARGS...]")
    leave(asyncio.run(Session(config).run()))


def leave(status: int) -> NoReturn:
    """Exit with `status`. When the command ended before the proxy stack finished loading, its import is
    still running in a daemon thread, and finalizing the interpreter under it can abort (a native
    module half initialised): jail then exits without finalizing; every resource is released by now."""
    from jail.proxy import import_in_flight

    if import_in_flight():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


# `jail log ...` and `jail policy ...` are tools; anything else is `jail [OPTIONS] -- COMMAND`.
TOOL_COMMANDS = ("log", "policy", "ask")


def run(argv: list[str] | None = None) -> None:
    """Console entry point: every failure the user can fix is one line on stderr."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == [WORKER_FLAG]:
        from jail.session import serve_as_worker

        configure_logging(0)
        sys.exit(serve_as_worker(int(args[1])))
    try:
        if args and args[0] in TOOL_COMMANDS:
            from jail.commands import tools

            status = tools.main(args, prog_name="jail", standalone_mode=False)
            sys.exit(status if isinstance(status, int) else 0)
        main.main(split_test_option(args), prog_name="jail", standalone_mode=False)
    except click.ClickException as exc:
        click.echo(f"jail: error: {exc.format_message()} (see jail --help)", err=True)
        sys.exit(USAGE_EXIT_STATUS)
    except click.exceptions.Abort:
        sys.exit(130)
    except JailError as exc:
        click.echo(f"jail: error: {exc}", err=True)
        sys.exit(JAIL_FAILURE_EXIT_STATUS)
    except KeyboardInterrupt:
        sys.exit(130)
