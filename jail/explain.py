"""`jail --explain`: what a jail with these flags would allow and restrict, in plain words.

Nothing is started: no proxy, no child, no rule engine, no namespace, no network. Policy files are
loaded (and so checked) exactly as a real run would load them; a broken one raises JailError.
"""

from __future__ import annotations

import os
import re
import shlex

from jail.policies import DEFAULT_TIMEOUTS, RuleSpec, rule_files
from jail.profiles import detect, home_dir
from jail.session import JailConfig

# What the isolated modes with a firewall do with TCP to any port (and with DNS and UDP).
TCP_BY_NAME = (
    "TCP to any address and port is redirected to jail, so programs that ignore proxy variables are judged"
    " too: HTTP and TLS per request (by Host / SNI, on any port), any other stream (SSH, databases) once as"
    ' CONNECT tcp://NAME:PORT (a rule allows it with scheme "tcp"), NAME being the name its synthetic address'
    " stands for (jail's resolver gives each name one; no query leaves the machine); UDP is refused, so QUIC"
    " falls back to TCP"
)
STRONG_GUARANTEES = (
    f"own network namespace; {TCP_BY_NAME}; ICMP and IPv6 are rejected; the command runs without capabilities"
)
ROOTLESS_GUARANTEES = (
    f"own user and network namespace with loopback only, jail the only way out; {TCP_BY_NAME}; DNS to any"
    " server gets jail's answer; the command runs as you, without capabilities over its network"
)
DOCKER_GUARANTEES = (
    f"the container's network is a bridge of its own whose only way out is jail; {TCP_BY_NAME}; the gateway"
    " takes only jail's proxy and DNS, nothing is forwarded, IPv6 is rejected"
)
NAMESPACE_GUARANTEES = (
    "own user and network namespace with loopback only and no firewall: jail's proxy (reached through the"
    " proxy variables) and its resolver are the only way out; a program that ignores the proxy variables"
    " reaches nothing (its connections fail at once) instead of being judged; the command runs as you,"
    " without capabilities over its network"
)
WEAK_LIMITS = (
    "only programs that honour the proxy variables (HTTP_PROXY, HTTPS_PROXY, ...) are judged;"
    " others (raw sockets, UDP, DNS, Node's fetch) go out unjudged"
)
_GLOB_REGEX_TOKEN = re.compile(r"\.\*|\[\^/\]\*|\[\^/\]|\\(.)", re.DOTALL)


def explain(config: JailConfig) -> str:
    """The explanation, one fact per line; raises JailError for a policy file that does not load."""
    lines = ["jail --explain: what this jail would do (nothing was started)"]
    lines += _managed(config)
    lines += _settings(config)
    lines.append(_what_runs(config))
    lines.append(_rule_header(config.rule))
    lines += [f"  {line}" for line in _rule_lines(config.rule)]
    lines += [f"  {line}" for line in _rule_file_lines(config)]
    lines.append(f"rule timeout: {_timeout(config.rule)}")
    if config.audit_mode:
        lines.append(
            "audit mode (--audit): every request is allowed; what the rule would deny is recorded as would-deny"
        )
    lines += _ask_lines(config)
    if config.fail_on_deny:
        lines.append("fail on deny (--fail-on-deny): exit non-zero if any request was (or would have been) denied")
    mode = _mode(config)
    lines.append(f"mode: {mode}")
    lines += _logs(config)
    if config.timeout is not None:
        lines.append(f"timeout: the command is killed after {config.timeout:g} s (exit 124)")
    private = config.allow_private
    if private:
        lines.append(f"private ranges the proxy may reach (--allow-private): {', '.join(private)}")
    lines.append(
        "address guard: loopback, link-local/metadata, multicast, broadcast and jail's own addresses are refused"
        + ("; private ranges too" if not mode.startswith(("weak", "none")) else "")
    )
    for secret in config.secrets:
        # Names and hosts only: the value never appears here.
        lines.append(
            f"secret {secret.name}: placeholder in the child, real value only for https://{', '.join(sorted(secret.hosts))}"
        )
    lines.append(_upstream(config))
    lines.extend(_clients(config))
    lines.extend(_profile(config))
    if not config.server:  # the proxy alone confines nothing
        lines.extend(_filesystem(config))
    return "\n".join(lines)


def _managed(config: JailConfig) -> list[str]:
    """The administrator's policy, asked before anything the user set (jail/policies/managed.py)."""
    from jail.policies.managed import ENVIRONMENT_VARIABLE, ManagedPolicy

    path = config.managed_policy
    if path is None:
        return [f"managed policy: none (/etc/jail/policy.toml or ${ENVIRONMENT_VARIABLE})"]
    default = ManagedPolicy(path).engine.policy.default
    meaning = (
        "what it does not deny goes on to the rule below"
        if default == "allow"
        else "only what it allows goes on to the rule below"
    )
    lines = [
        f"managed policy: {path} (root's), asked first: its denials are final (audit mode, --ask, a profile's"
        f" hosts and the rule below cannot lift them); default {default}: {meaning}"
    ]
    return lines + [f"  {line}" for line in _policy_lines(RuleSpec("policy", files=(path,)))]


def _settings(config: JailConfig) -> list[str]:
    """Where each setting came from: a flag, the project file or the user file (flags win, then the project)."""
    files = ", ".join(map(str, config.config_files)) or "none"
    lines = [f"config files read (flags win over the project file, it over the user file): {files}"]
    lines += [f"  {flag}: {'flag' if where == 'flag' else 'from ' + where}" for flag, where in config.setting_origins]
    lines += [f"  {note} (one choice: the highest source that makes it wins)" for note in config.config_overrides]
    return lines


def _clients(config: JailConfig) -> list[str]:
    """--clients: who may name themselves (names only: a token never appears here)."""
    clients = config.clients
    if clients is None:
        return []
    unnamed = "get 407 (--require-client)" if clients.required else 'are let in as client ""'
    return [
        f"named clients (--clients): {', '.join(sorted(clients.tokens))}; rules see r.client, JAIL_CLIENT, policy"
        f" client; a wrong token gets 407, clients without credentials {unnamed}"
    ]


def _ask_lines(config: JailConfig) -> list[str]:
    """Who is asked, for how long, and where "always" answers go (jail/approvals)."""
    ask = config.ask
    which = "every denial by the rule, and every ask" if ask.ask_denials else "only when the rule answers ask"
    lines = [
        f"questions ({'--ask' if ask.ask_denials else 'no --ask'}): {which} waits for `jail ask`"
        + (f" or --ask-fd {ask.fd}" if ask.fd else "")
        + f", denied after {ask.timeout:g} s without an answer"
    ]
    if ask.save_to is not None:
        lines.append(f"  always answers are appended to {ask.save_to} (read-only to the command)")
    return lines


def _what_runs(config: JailConfig) -> str:
    if config.server:
        host, port = config.listen
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        workers = f", in {config.workers} processes sharing it (--workers)" if config.workers > 1 else ""
        return (
            f"command: none; would run only the proxy (--server) on {address}{workers}, for programs started separately"
        )
    if config.command:
        return f"command: would run {shlex.join(config.command)}"
    return "command: none given (a real run needs one: jail [OPTIONS] -- COMMAND [ARGS...])"


def _rule_header(spec: RuleSpec) -> str:
    if spec.kind == "js":
        return "engine: JavaScript (--js), the request is `r`"
    if spec.kind == "js_file":
        return f"engine: JavaScript file (--js-file) {spec.source}, reloaded when it changes"
    if spec.kind == "sh":
        return "engine: shell script (--sh), run once per request; exit 0 allows"
    if spec.kind == "proc":
        return "engine: line processor (--proc), one long-lived program; JSON lines in, answers out"
    if spec.kind == "policy":
        return f"engine: policy files (--policy) {', '.join(str(file) for file in spec.files)}"
    return "engine: none"


def _rule_lines(spec: RuleSpec) -> list[str]:
    if spec.kind == "js":
        return [f"code: {spec.source}"]
    if spec.kind == "js_file":
        return [f"file: {spec.source}"]
    if spec.kind == "sh":
        return [f"script: {spec.source}"]
    if spec.kind == "proc":
        return [f"program: {spec.source}"]
    if spec.kind == "policy":
        return _policy_lines(spec)
    return ["no rule: everything is denied"]


def _policy_lines(spec: RuleSpec) -> list[str]:
    from jail.policies.policy_file import load_policy

    policy = load_policy(spec.files)
    lines = [f"rules, in order (the first that matches decides): {len(policy.rules)}"]
    if not policy.rules:
        lines[0] = "rules: none"
    for number, rule in enumerate(policy.rules, start=1):
        hosts = sorted(rule.hosts) + ["*" + suffix for suffix in rule.host_suffixes]
        paths = list(rule.path_prefixes) + [_glob_text(glob.pattern) for glob in rule.path_globs]
        fields = [
            f"{number}. {rule.action}",
            f"host {_join(hosts)}" if not rule.any_host else "any host",
            f"port {_join([str(port) for port in sorted(rule.ports)])}" if rule.ports is not None else "any port",
            f"scheme {_join(sorted(rule.schemes))}" if rule.schemes is not None else "any scheme",
            f"methods {_join(sorted(rule.methods))}" if rule.methods is not None else "any method",
            f"path {_join(paths)}" if rule.has_path else "any path",
        ]
        if rule.max_tx_bytes is not None:
            fields.append(f"max_tx_bytes {rule.max_tx_bytes}")
        fields.append(f"name {rule.label}")
        if rule.reason:
            fields.append(f"reason {rule.reason!r}")
        lines.append(", ".join(fields))
    where = f" (set at {policy.default_where})" if policy.default_where else " (no file sets it)"
    lines.append(f"default: {policy.default}{where}")
    hook = policy.hooks
    if hook is None:
        lines.append("hooks: none")
    else:
        lines.append(
            f"hooks: {hook.kind} {hook.source!r} ({hook.where}), asked when no rule matches, instead of the default"
        )
    if policy.expectations:
        lines.append(f"examples: {len(policy.expectations)} [[expect]] (checked by `jail policy check`, not here)")
    return lines


def _glob_text(regex: str) -> str:
    """The glob a compiled path pattern was written as (the inverse of policy_file.compile_glob)."""
    tokens = {".*": "**", "[^/]*": "*", "[^/]": "?"}
    return _GLOB_REGEX_TOKEN.sub(lambda match: match.group(1) or tokens[match.group(0)], regex)


def _join(values: list[str]) -> str:
    return "|".join(values)


def _timeout(spec: RuleSpec) -> str:
    if spec.kind is None:
        return "not used (no rule)"
    if spec.timeout is not None:
        return f"{spec.timeout:g} s (--rule-timeout)"
    return f"{DEFAULT_TIMEOUTS[spec.kind]:g} s (default; --rule-timeout changes it)"


def _upstream(config: JailConfig) -> str:
    """The proxy allowed requests leave through, and the CA files upstream servers are verified against."""
    from jail.proxy.ca import TrustSources
    from jail.proxy.upstream import UpstreamProxies

    trust = TrustSources.gather(config.upstream_ca)
    proxies = UpstreamProxies.configure(config.upstream_proxy)
    return f"upstream: {proxies.describe()}; servers verified against {', '.join(map(str, trust.files))}"


def _mode(config: JailConfig) -> str:
    from jail.model import JailError
    from jail.platform import choose_mode

    if config.server:
        return "none (--server): nothing is confined; what programs send to the proxy is judged, and only that"

    try:
        mode, reason = choose_mode(config.weak, config.user, config.docker_run, config.allow_weak)
    except JailError as exc:
        return f"none, so a real run would fail: {exc}"
    if mode == "weak":
        return f"weak, because of --weak: {WEAK_LIMITS}" if config.weak else f"weak ({reason}): {WEAK_LIMITS}"
    user = f"; as user {config.user}" if config.user else ""
    return {
        "strong": f"strong: {STRONG_GUARANTEES}{user}",
        "rootless": f"rootless: {ROOTLESS_GUARANTEES}",
        "namespace": f"namespace ({reason}): {NAMESPACE_GUARANTEES}",
        "docker": f"docker: {DOCKER_GUARANTEES}",
    }[mode]


def _logs(config: JailConfig) -> list[str]:
    lines = []
    if config.request_log is not None:
        lines.append(f"request log: {config.request_log} (one `TIME +|- METHOD URL` line per request)")
    if config.audit_log is not None:
        values = "with header values" if config.log_header_values else "header names only"
        lines.append(f"audit log: {config.audit_log} (one JSON object per request, {values})")
    if config.otlp:
        where = config.otlp_endpoint or "the OTEL_EXPORTER_OTLP_* endpoint"
        lines.append(f"OpenTelemetry: a log record per decision, a span per allowed request, to {where} (OTLP/HTTP)")
    if config.har is not None:
        bodies = "with bodies, secrets masked" if config.har_bodies else "no bodies"
        lines.append(f"HAR: {config.har} (HAR 1.2, written at the end of the run; {bodies})")
    if not lines:
        lines.append("logs: none")
    return lines


def _filesystem(config: JailConfig) -> list[str]:
    policy = config.filesystem
    if policy is None or not policy.enabled:
        return ["filesystem: not restricted (--no-fs-restrictions)"]
    writable = "nothing but a private temp dir (--read-only)" if policy.read_only else ", ".join(policy.allow_write)
    lines = [
        "filesystem (Landlock): everything readable except the denied paths; writes only where allowed",
        f"  writable: {writable}" + ("" if policy.read_only else " and a private temp dir"),
        f"  unreadable: {', '.join([*policy.deny_read, _ca_private_files(config)])}",
        f"  always read-only: {', '.join(policy.protect) or 'nothing'}",
        f"  unix sockets: {', '.join(policy.allow_unix_sockets) or 'none may be opened'}",
        _caches(policy),
    ]
    return lines


def _ca_private_files(config: JailConfig) -> str:
    from jail.proxy.ca import default_ca_dir

    directory = config.ca_dir or default_ca_dir()
    return f"every file holding the CA's private key in {directory} (all but trust/ and the certificate)"


def _rule_file_lines(config: JailConfig) -> list[str]:
    files = rule_files(config.rule)
    if not files:
        return []
    policy = config.filesystem
    if policy is None or not policy.enabled:
        return [f"rule files (writable by the command where you can write, --no-fs-restrictions): {_paths(files)}"]
    return [f"rule files, read-only inside the jail (the command cannot rewrite its rule): {_paths(files)}"]


def _profile(config: JailConfig) -> list[str]:
    profile = config.profile
    if profile is None:
        detected = detect(config.command)
        return [
            f"agent profile: none (--no-profile; the command runs {detected.name})"
            if detected
            else "agent profile: none"
        ]
    how = f"--profile {profile.name}" if config.profile_named else "told from the command; --no-profile turns it off"
    lines = [f"agent profile: {profile.name} ({profile.description}), {how}"]
    home, environ = home_dir(), dict(os.environ)
    policy = config.filesystem
    if policy is None or not policy.enabled:
        lines.append("  folders and files: nothing to open (--no-fs-restrictions)")
    elif policy.read_only:
        lines.append("  folders and files: not opened (--read-only)")
    else:
        lines.append(f"  writable state folders (made if missing, mode 0700): {_paths(profile.folders(home, environ))}")
        files = profile.home_files(home, environ)
        if files:
            lines.append(
                f"  files it may rewrite in place, their folder staying closed (made if missing): {_paths(files)}"
            )
    if not profile.hosts:
        lines.append("  hosts: none (its model API is the provider you set up: allow it in the rule)")
    elif config.profile_named:
        lines.append(
            f"  hosts allowed over HTTPS whatever the rule answers (engine profile:{profile.name}): {', '.join(profile.hosts)}"
        )
    else:
        lines.append(
            f"  hosts it needs, not allowed (a profile told from the command never widens the rule;"
            f" --profile {profile.name} allows them): {', '.join(profile.hosts)}"
        )
    return lines


def _paths(paths) -> str:
    return ", ".join(str(path) for path in paths)


def _caches(policy) -> str:
    if not policy.caches:
        return "  package caches: none found"
    if policy.keep_caches:
        how = (
            "written through (--keep-caches): what the command writes there stays, a poisoned entry included,"
            " for later runs outside the jail"
        )
    else:
        how = (
            "copy-on-write: reads see your cache, writes land in a layer private to the run, dropped at its end"
            " (a missing folder is made empty first)"
        )
    return f"  package caches, {how}: {', '.join(policy.caches)}"
