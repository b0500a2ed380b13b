"""`--policy FILE`: declarative rules in TOML, first match wins, checked strictly when loaded.

Schema (every key is optional unless marked required; any other key is an error)::

    default = "deny"            # or "allow", or "ask" (a person answers: jail/approvals); deny when no file sets it
    [[rule]]                    # any number, tried in order; the first rule that matches decides
    name = "github-read"        # Decision.rule is this name, or "FILE:LINE" of the [[rule]] header
    action = "allow"            # required: "allow" | "deny" | "ask" (a person answers: jail/approvals)
    host = "api.github.com"     # exact, or "*.example.com" (any subdomain, NOT example.com itself),
                                # or a list of them; absent: any host
    port = 443                  # an integer or a list of them
    scheme = "https"            # "http" | "https" | "tcp" (a plain TCP stream, e.g. SSH), or a list
    methods = ["GET", "HEAD"]   # a method or a list of them
    client = "agent-7"          # the name a `jail --server` client proved (--clients), or a list;
                                # "" is a client that gave none
    path = "/repos/"            # a prefix; a glob when it contains * or ? ('*' and '?' stay
                                # within one segment, '**' crosses '/'; the whole path must
                                # match); or a list of them. The query is never part of the path.
    reason = "read-only GitHub" # shown in the 403 of a deny rule, logged for an allow rule
    max_tx_bytes = 0            # allow rules only: cap the upload (413 over it)

    [hooks]                     # consulted only for requests that no rule matched, instead of default
    js = "r.host.endsWith('.internal')"   # or js_file = "rule.js" (relative to this file),
                                          # sh = "...", proc = "..." (run from jail's working
                                          # directory) -- exactly one of them

    [[expect]]                  # examples verified by `jail policy check`; ignored when jailing
    request = "POST https://api.github.com/repos/x/y/issues"   # required: "METHOD URL" or "URL" (GET)
    decision = "deny"           # required: "allow" | "deny"

    [filesystem]                # reserved for filesystem rules: must be a table, ignored for now

A rule matches when every condition it has holds. Hosts compare whole names (the request's host is
already lower-case IDNA, and so are the patterns once loaded): `api.github.com` matches neither
`api.github.com.evil.example` nor `apiXgithubYcom`; `*.github.com` matches `api.github.com` and
`a.b.github.com`, but neither `github.com` nor `evilgithub.com`.

Paths are compared as sent, except that a path not in canonical form (a `.` or `..` segment, or a
percent-encoded letter, digit, `-`, `.`, `_` or `~`) fails closed: it never satisfies an allow rule's
`path`, and it satisfies a deny rule's `path` when either the path as sent or its canonical form does.

A plain TCP stream (SSH, a database; jail's isolated modes see them on any port) is judged once as
`CONNECT tcp://host:port`: scheme "tcp", method CONNECT, no path, query or headers. A rule with a
`path`, or `methods` without CONNECT, never matches it; a rule without `scheme` matches it too, so
`scheme = "tcp"` plus `host` and `port` is the way to allow one (`host = "github.com"`, `port = 22`).

Several files compose in the order given: their rules are appended, the first matching rule wins, and
for `default` and `[hooks]` the last file that sets one wins. Hooks reuse the engines of `--js`,
`--js-file`, `--sh` and `--proc`, with their own default timeouts capped by the policy's timeout.

Every mistake raises JailError as one line `FILE:LINE: what is wrong`, naming the key.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from jail.model import Decision, JailError, Request, normalize_host
from jail.model import canonical_path as canonical_form
from jail.policies import DEFAULT_TIMEOUTS, Engine, RuleSpec, build_engine

TOP_KEYS = ("default", "rule", "hooks", "expect", "filesystem")
RULE_KEYS = ("name", "action", "host", "port", "scheme", "methods", "client", "path", "reason", "max_tx_bytes")
HOOK_KEYS = ("js", "js_file", "sh", "proc")
EXPECT_KEYS = ("request", "decision")
ACTIONS = ("allow", "deny", "ask")
EXPECTED_DECISIONS = ("allow", "deny")
SCHEMES = ("http", "https", "tcp")

_METHOD_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HOST_LABEL_RE = re.compile(r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?")
_GLOB_TOKEN_RE = re.compile(r"(\*\*|\*|\?)")
_TOML_POSITION_RE = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")
_AT_END = " (at end of document)"


# ---------------------------------------------------------------------------------------------
# Where keys are: tomllib gives values only, so the raw text is scanned for table headers and keys.


_KEY = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*')"""
_KEY_PATH = rf"{_KEY}(?:\s*\.\s*{_KEY})*"
_ARRAY_HEADER_RE = re.compile(rf"\s*\[\[\s*({_KEY_PATH})\s*\]\]")
_TABLE_HEADER_RE = re.compile(rf"\s*\[\s*({_KEY_PATH})\s*\]")
_KEY_LINE_RE = re.compile(rf"\s*({_KEY_PATH})\s*=")
_KEY_PART_RE = re.compile(_KEY)


def _key_parts(key_path: str) -> list[str]:
    return [part.strip("\"'") for part in _KEY_PART_RE.findall(key_path)]


@dataclass
class _Section:
    """One table of the file: its header line and the first line of each key in it."""

    line: int
    keys: dict[str, int] = field(default_factory=dict)


class _ValueScanner:
    """Tracks whether a line continues a value (a multi-line string or array) started above it."""

    def __init__(self) -> None:
        self.open_string: str | None = None
        self.depth = 0

    @property
    def continuing(self) -> bool:
        return self.open_string is not None or self.depth > 0

    def feed(self, line: str, index: int = 0) -> None:
        while index < len(line):
            if self.open_string is not None:
                end = line.find(self.open_string, index)
                while end > 0 and self.open_string == '"""' and _escaped(line, end):
                    end = line.find('"""', end + 1)
                if end < 0:
                    return
                index = end + 3
                while index < len(line) and line[index] == self.open_string[0]:
                    index += 1  # up to two quotes may close the string's content
                self.open_string = None
                continue
            char = line[index]
            if char == "#":
                return
            if line.startswith(('"""', "'''"), index):
                self.open_string = line[index : index + 3]
                index += 3
            elif char == '"':
                index += 1
                while index < len(line) and line[index] != '"':
                    index += 2 if line[index] == "\\" else 1
                index += 1
            elif char == "'":
                end = line.find("'", index + 1)
                index = end + 1 if end >= 0 else len(line)
            else:
                if char in "[{":
                    self.depth += 1
                elif char in "]}":
                    self.depth = max(0, self.depth - 1)
                index += 1


def _escaped(line: str, index: int) -> bool:
    backslashes = 0
    while index - backslashes - 1 >= 0 and line[index - backslashes - 1] == "\\":
        backslashes += 1
    return backslashes % 2 == 1


class Locator:
    """Line numbers of top-level keys, of every `[table]` / `[[array]]` header and of the keys under them."""

    def __init__(self, text: str) -> None:
        self.top: dict[str, int] = {}
        self.tables: dict[str, list[_Section]] = {}
        current: dict[str, int] = self.top
        scanner = _ValueScanner()
        for number, line in enumerate(text.split("\n"), start=1):
            if scanner.continuing:
                scanner.feed(line)
                continue
            header = _ARRAY_HEADER_RE.match(line) or _TABLE_HEADER_RE.match(line)
            if header is not None:
                current = self._enter(_key_parts(header.group(1)), number)
                continue
            key = _KEY_LINE_RE.match(line)
            if key is not None:
                current.setdefault(_key_parts(key.group(1))[0], number)
                scanner.feed(line, key.end())

    def _enter(self, parts: list[str], number: int) -> dict[str, int]:
        self.top.setdefault(parts[0], number)
        if len(parts) > 1:  # [rule.sub]: a key of the latest [[rule]]
            sections = self.tables.get(parts[0])
            if sections:
                sections[-1].keys.setdefault(parts[1], number)
        section = _Section(number)
        self.tables.setdefault(".".join(parts), []).append(section)
        return section.keys

    def line(self, table: str | None = None, index: int = 0, key: str | None = None) -> int:
        """The line of `key` in the `index`-th `table` (the table's header when the key is not found)."""
        if table is None:
            return self.top.get(key or "", 1)
        sections = self.tables.get(table, [])
        if index < len(sections):
            section = sections[index]
            return section.keys.get(key, section.line) if key else section.line
        return self.top.get(table, 1)  # an inline table or array: the line of its key


# ---------------------------------------------------------------------------------------------
# The loaded policy.


@dataclass(frozen=True, eq=False)
class Rule:
    """One `[[rule]]`, compiled: matching is set lookups, string prefixes and precompiled regexes."""

    file: str
    line: int
    action: str
    name: str = ""
    hosts: frozenset[str] = frozenset()
    host_suffixes: tuple[str, ...] = ()
    any_host: bool = True
    ports: frozenset[int] | None = None
    schemes: frozenset[str] | None = None
    methods: frozenset[str] | None = None
    clients: frozenset[str] | None = None
    path_prefixes: tuple[str, ...] = ()
    path_globs: tuple[re.Pattern[str], ...] = ()
    has_path: bool = False
    reason: str = ""
    max_tx_bytes: int | None = None
    decision: Decision = field(default_factory=lambda: Decision.denied(""))

    @property
    def label(self) -> str:
        return self.name or f"{self.file}:{self.line}"

    @property
    def allow(self) -> bool:
        return self.action == "allow"

    def matches(self, request: Request, canonical_path: str | None) -> bool:
        """`canonical_path` is None when the request's path is already canonical."""
        if self.methods is not None and request.method not in self.methods:
            return False
        if self.schemes is not None and request.scheme not in self.schemes:
            return False
        if self.ports is not None and request.port not in self.ports:
            return False
        if self.clients is not None and request.client not in self.clients:
            return False
        if not self.any_host and not self._host_matches(request.host):
            return False
        if not self.has_path:
            return True
        if not request.path:
            return False  # a TCP stream has no path: a rule that names one is about HTTP
        if canonical_path is None:
            return self._path_matches(request.path)
        if self.allow:
            return False  # fail closed: an ambiguous path never satisfies an allow rule's path
        return self._path_matches(request.path) or self._path_matches(canonical_path)

    def _host_matches(self, host: str) -> bool:
        if host in self.hosts:
            return True
        return any(len(host) > len(suffix) and host.endswith(suffix) for suffix in self.host_suffixes)

    def _path_matches(self, path: str) -> bool:
        return path.startswith(self.path_prefixes) or any(glob.fullmatch(path) for glob in self.path_globs)

    def signature(self) -> tuple[Any, ...]:
        """What the rule decides and on what, without where it is written (to compare policies)."""
        return (
            self.action,
            self.hosts,
            self.host_suffixes,
            self.any_host,
            self.ports,
            self.schemes,
            self.methods,
            self.clients,
            self.path_prefixes,
            tuple(glob.pattern for glob in self.path_globs),
            self.reason,
            self.max_tx_bytes,
        )


@dataclass(frozen=True)
class Hook:
    kind: str  # a RuleSpec kind: js, js_file, sh, proc
    source: str
    file: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Expectation:
    file: str
    line: int
    request: Request
    allow: bool

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class PolicyFile:
    name: str
    rules: list[Rule] = field(default_factory=list)
    default: tuple[str, int] | None = None  # (action, line)
    hooks: Hook | None = None
    expectations: list[Expectation] = field(default_factory=list)


@dataclass
class Policy:
    """Several policy files composed: rules appended in order; the last `default` and `[hooks]` win."""

    files: tuple[str, ...]
    rules: list[Rule]
    default: str
    default_where: str
    hooks: Hook | None
    expectations: list[Expectation]

    @classmethod
    def compose(cls, parts: Sequence[PolicyFile]) -> Policy:
        default, default_where, hooks = "deny", "", None
        for part in parts:
            if part.default is not None:
                default, default_where = part.default[0], f"{part.name}:{part.default[1]}"
            if part.hooks is not None:
                hooks = part.hooks
        return cls(
            files=tuple(part.name for part in parts),
            rules=[rule for part in parts for rule in part.rules],
            default=default,
            default_where=default_where,
            hooks=hooks,
            expectations=[example for part in parts for example in part.expectations],
        )

    def default_decision(self) -> Decision:
        files = ", ".join(self.files)
        if self.default == "allow":
            return Decision(
                True, f"no policy rule matched; default allow ({self.default_where})", "policy_default", rule="default"
            )
        if self.default == "ask":
            return Decision.asking(f"no policy rule matched; default ask ({self.default_where})", rule="default")
        return Decision.denied(f"no policy rule matched (policy files: {files})", "policy_default", rule="default")


def load_policy(files: Iterable[Path | str]) -> Policy:
    """Load, check and compose policy files; raises JailError naming FILE:LINE and the key."""
    parts = [load_file(Path(file)) for file in files]
    if not parts:
        raise JailError("no policy file given")
    return Policy.compose(parts)


def read_toml(path: Path, name: str, what: str) -> tuple[str, dict[str, Any]]:
    """The text and the document of a TOML file jail reads (a policy or config file); every mistake is one
    JailError naming the file (and the line, for TOML errors)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise JailError(f"{name}: cannot read {what}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise JailError(f"{name}: not UTF-8 text: {exc}") from None
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise JailError(toml_error(name, text, exc)) from None


def load_file(path: Path) -> PolicyFile:
    name = str(path)
    text, document = read_toml(path, name, "policy file")
    return _FileLoader(path, name, text).load(document)


def toml_error(name: str, text: str, exc: tomllib.TOMLDecodeError) -> str:
    message = str(exc).splitlines()[0] if str(exc) else "invalid TOML"
    position = _TOML_POSITION_RE.search(message)
    line = getattr(exc, "lineno", None)
    if position is not None:
        line = int(position.group(1))
        message = f"{message[: position.start()]} (column {position.group(2)})"
    elif message.endswith(_AT_END):
        line = len(text.rstrip().split("\n"))  # the last line that has something on it
        message = message[: -len(_AT_END)] + " at the end of the file"
    return f"{name}:{line}: invalid TOML: {message}" if line else f"{name}: invalid TOML: {message}"


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_show(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key} = {_show(item)}" for key, item in value.items()) + "}"
    return str(value)


def _as_list(value: Any) -> list[Any] | None:
    """A scalar as a one-item list; a non-empty list as is; None for an empty list."""
    if isinstance(value, list):
        return value or None
    return [value]


class _FileLoader:
    def __init__(self, path: Path, name: str, text: str) -> None:
        self.path = path
        self.name = name
        self.where = Locator(text)

    def fail(self, line: int, message: str) -> JailError:
        return JailError(f"{self.name}:{line}: {message}")

    def load(self, document: dict[str, Any]) -> PolicyFile:
        result = PolicyFile(self.name)
        self._check_keys(document, TOP_KEYS, "", lambda key: self.where.line(key=key), "top-level key")
        if "default" in document:
            value = document["default"]
            if value not in ACTIONS:
                raise self.fail(
                    self.where.line(key="default"), f'\'default\' must be "allow", "deny" or "ask", not {_show(value)}'
                )
            result.default = (value, self.where.line(key="default"))
        for index, table in enumerate(self._tables(document, "rule")):
            result.rules.append(self._rule(index, table, result.rules))
        if "hooks" in document:
            result.hooks = self._hooks(self._table(document, "hooks"))
        for index, table in enumerate(self._tables(document, "expect")):
            result.expectations.append(self._expectation(index, table))
        if "filesystem" in document:
            self._table(document, "filesystem")  # reserved: checked to be a table, otherwise ignored
        return result

    def _check_keys(self, table: dict[str, Any], known: tuple[str, ...], prefix: str, line_of: Any, what: str) -> None:
        unknown = [key for key in table if key not in known]
        if unknown:
            key = min(unknown, key=line_of)
            raise self.fail(line_of(key), f"{prefix}unknown {what} {key!r} (known: {', '.join(known)})")

    def _table(self, document: dict[str, Any], key: str) -> dict[str, Any]:
        value = document[key]
        if not isinstance(value, dict):
            raise self.fail(self.where.line(key=key), f"'{key}' must be a table: write [{key}]")
        return value

    def _tables(self, document: dict[str, Any], key: str) -> list[dict[str, Any]]:
        value = document.get(key, [])
        if isinstance(value, dict):
            raise self.fail(
                self.where.line(key=key), f"'{key}' must be an array of tables: write [[{key}]], not [{key}]"
            )
        if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
            raise self.fail(self.where.line(key=key), f"'{key}' must be an array of tables: write [[{key}]]")
        return value

    # --- [[rule]] ---

    def _rule(self, index: int, table: dict[str, Any], earlier: list[Rule]) -> Rule:
        header = self.where.line("rule", index)
        prefix = f"rule {index + 1}: "

        def line_of(key: str) -> int:
            return self.where.line("rule", index, key)

        def bad(key: str, expected: str) -> JailError:
            return self.fail(line_of(key), f"{prefix}'{key}' must be {expected}, not {_show(table[key])}")

        self._check_keys(table, RULE_KEYS, prefix, line_of, "key")
        if "action" not in table:
            raise self.fail(header, f'{prefix}missing required key \'action\' ("allow", "deny" or "ask")')
        action = table["action"]
        if action not in ACTIONS:
            raise bad("action", '"allow", "deny" or "ask"')
        fields: dict[str, Any] = {"file": self.name, "line": header, "action": action}

        if "name" in table:
            name = table["name"]
            if not isinstance(name, str) or not name.strip():
                raise bad("name", "a non-empty string")
            for other in earlier:
                if other.name == name:
                    raise self.fail(
                        line_of("name"),
                        f"{prefix}'name' {_show(name)} is already used by the rule at line {other.line}",
                    )
            fields["name"] = name
        if "host" in table:
            patterns = _as_list(table["host"])
            if patterns is None or not all(isinstance(item, str) for item in patterns):
                raise bad("host", 'a host name, "*.domain" or a list of them')
            exact: set[str] = set()
            suffixes: list[str] = []
            for pattern in patterns:
                try:
                    kind, value = compile_host(pattern)
                except ValueError as exc:
                    raise self.fail(line_of("host"), f"{prefix}'host' {_show(pattern)}: {exc}") from None
                if kind == "exact":
                    exact.add(value)
                elif value not in suffixes:
                    suffixes.append(value)
            fields.update(hosts=frozenset(exact), host_suffixes=tuple(suffixes), any_host=False)
        if "port" in table:
            ports = _as_list(table["port"])
            if ports is None or not all(type(port) is int and 0 < port < 65536 for port in ports):
                raise bad("port", "a port number (1-65535) or a list of them")
            fields["ports"] = frozenset(ports)
        if "scheme" in table:
            schemes = _as_list(table["scheme"])
            if schemes is None or not all(scheme in SCHEMES for scheme in schemes):
                raise bad("scheme", '"http", "https", "tcp" or a list of them')
            fields["schemes"] = frozenset(schemes)
        if "methods" in table:
            methods = _as_list(table["methods"])
            if methods is None or not all(isinstance(m, str) and _METHOD_RE.fullmatch(m) for m in methods):
                raise bad("methods", 'a list of HTTP methods such as ["GET", "HEAD"]')
            fields["methods"] = frozenset(method.upper() for method in methods)
        if "client" in table:
            clients = _as_list(table["client"])
            if clients is None or not all(isinstance(name, str) for name in clients):
                raise bad("client", 'a client name (--clients) or a list of them; "" for an unnamed client')
            fields["clients"] = frozenset(clients)
        if "path" in table:
            paths = _as_list(table["path"])
            if paths is None or not all(isinstance(p, str) and p.startswith(("/", "*")) for p in paths):
                raise bad("path", 'a path starting with "/" (a prefix, or a glob with * and ?) or a list of them')
            prefixes = [p for p in paths if not _GLOB_TOKEN_RE.search(p)]
            globs = [compile_glob(p) for p in paths if _GLOB_TOKEN_RE.search(p)]
            fields.update(path_prefixes=tuple(prefixes), path_globs=tuple(globs), has_path=True)
        if "reason" in table:
            if not isinstance(table["reason"], str):
                raise bad("reason", "a string")
            fields["reason"] = table["reason"]
        if "max_tx_bytes" in table:
            limit = table["max_tx_bytes"]
            if action != "allow":
                raise self.fail(line_of("max_tx_bytes"), f"{prefix}'max_tx_bytes' only applies to allow rules")
            if type(limit) is not int or limit < 0:
                raise bad("max_tx_bytes", "a non-negative integer (bytes)")
            fields["max_tx_bytes"] = limit

        rule = Rule(**fields)
        if rule.allow:
            decision = Decision.allowed(rule.reason, rule.max_tx_bytes, rule=rule.label)
        elif action == "ask":
            decision = Decision.asking(rule.reason or f"policy rule {rule.label} asks a person", rule=rule.label)
        else:
            decision = Decision.denied(rule.reason or f"denied by policy rule {rule.label}", rule=rule.label)
        return replace(rule, decision=decision)

    # --- [hooks] ---

    def _hooks(self, table: dict[str, Any]) -> Hook:
        def line_of(key: str) -> int:
            return self.where.line("hooks", 0, key)

        self._check_keys(table, HOOK_KEYS, "hooks: ", line_of, "key")
        if len(table) != 1:
            line = line_of(sorted(table, key=line_of)[1]) if table else self.where.line("hooks")
            raise self.fail(line, f"hooks: give exactly one of {', '.join(HOOK_KEYS)}")
        ((kind, source),) = table.items()
        if not isinstance(source, str) or not source.strip():
            raise self.fail(line_of(kind), f"hooks: '{kind}' must be a non-empty string, not {_show(source)}")
        if kind == "js_file":
            resolved = (self.path.parent / source).resolve()
            if not resolved.is_file():
                raise self.fail(line_of(kind), f"hooks: 'js_file' {_show(source)} not found (looked for {resolved})")
            source = str(resolved)
        return Hook(kind, source, self.name, line_of(kind))

    # --- [[expect]] ---

    def _expectation(self, index: int, table: dict[str, Any]) -> Expectation:
        prefix = f"expect {index + 1}: "

        def line_of(key: str) -> int:
            return self.where.line("expect", index, key)

        self._check_keys(table, EXPECT_KEYS, prefix, line_of, "key")
        for key in EXPECT_KEYS:
            if key not in table:
                raise self.fail(self.where.line("expect", index), f"{prefix}missing required key '{key}'")
        text, decision = table["request"], table["decision"]
        if decision not in EXPECTED_DECISIONS:
            raise self.fail(
                line_of("decision"), f'{prefix}\'decision\' must be "allow" or "deny", not {_show(decision)}'
            )
        if not isinstance(text, str):
            raise self.fail(line_of("request"), f"{prefix}'request' must be a string \"METHOD URL\", not {_show(text)}")
        try:
            request = parse_example(text)
        except ValueError as exc:
            raise self.fail(line_of("request"), f"{prefix}'request': {exc}") from None
        return Expectation(self.name, self.where.line("expect", index), request, decision == "allow")


def parse_example(text: str) -> Request:
    """`METHOD URL` or `URL` (GET), as written in `[[expect]] request`."""
    words = text.split()
    if len(words) == 1:
        return Request.from_url(words[0])
    if len(words) == 2 and _METHOD_RE.fullmatch(words[0]):
        return Request.from_url(words[1], words[0])
    raise ValueError(f'expected "METHOD URL" or "URL", not {_show(text)}')


def compile_host(pattern: str) -> tuple[str, str]:
    """("exact", host) or ("suffix", ".domain") for "*.domain"; ValueError says what is wrong."""
    text = pattern.strip()
    if not text:
        raise ValueError("empty host")
    if "/" in text or " " in text or (":" in text and text.count(":") == 1):
        raise ValueError("a host name only: put the port in 'port', the scheme in 'scheme', the path in 'path'")
    if text == "*":
        raise ValueError("leave 'host' out to match any host")
    wildcard = text.startswith("*.")
    name = text[2:] if wildcard else text
    if "*" in name:
        raise ValueError('a wildcard is only allowed as the first label: "*.example.com"')
    try:
        host = normalize_host(name)
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    if ":" in host or host.replace(".", "").isdigit():  # an IP address
        if wildcard:
            raise ValueError("an IP address cannot have a wildcard")
        return "exact", host
    labels = host.split(".")
    if not all(_HOST_LABEL_RE.fullmatch(label) for label in labels):
        raise ValueError("not a valid host name")
    if wildcard and labels[-1].isdigit():
        raise ValueError("an IP address cannot have a wildcard")
    return ("suffix", "." + host) if wildcard else ("exact", host)


def compile_glob(pattern: str) -> re.Pattern[str]:
    """`*` and `?` within one path segment, `**` across segments; matched against the whole path."""
    regex = []
    for token in _GLOB_TOKEN_RE.split(pattern):
        if token == "**":
            regex.append(".*")
        elif token == "*":
            regex.append("[^/]*")
        elif token == "?":
            regex.append("[^/]")
        else:
            regex.append(re.escape(token))
    return re.compile("".join(regex), re.DOTALL)


def canonical_path(path: str) -> str | None:
    """The path's canonical form (jail.model.canonical_path); None if it is already canonical (or
    there is none: a TCP stream's path is empty)."""
    if not path:
        return None
    resolved = canonical_form(path)
    return None if resolved == path else resolved


# ---------------------------------------------------------------------------------------------


class PolicyEngine:
    """The Engine for policy files: the first matching rule decides; then the hook, or the default."""

    name = "policy"

    def __init__(self, files: Iterable[Path | str], timeout: float = DEFAULT_TIMEOUTS["policy"]) -> None:
        self.policy = load_policy(files)
        self.timeout = timeout
        self._default = self.policy.default_decision()
        self._hook: Engine | None = None

    async def start(self) -> None:
        hook = self.policy.hooks
        if hook is not None:
            timeout = min(self.timeout, DEFAULT_TIMEOUTS[hook.kind])
            try:
                engine = build_engine(RuleSpec(hook.kind, hook.source, timeout))  # type: ignore[arg-type]
                await engine.start()
            except JailError as exc:
                raise JailError(f"{hook.where}: hooks: {exc}") from None
            self._hook = engine

    async def decide(self, request: Request) -> Decision:
        canonical = canonical_path(request.path)
        for rule in self.policy.rules:
            if rule.matches(request, canonical):
                return rule.decision
        hook = self.policy.hooks
        if hook is None:
            return self._default
        if self._hook is None:
            raise RuntimeError("the policy's hook was not started")
        decision = await self._hook.decide(request)
        return decision if decision.rule else replace(decision, rule=hook.where)

    async def close(self) -> None:
        if self._hook is not None:
            engine, self._hook = self._hook, None
            await engine.close()
