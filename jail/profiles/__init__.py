"""Agent profiles: what a known coding agent needs to work in the jail, as data (one TOML file per agent).

A profile names the agent's state folders (made writable, created if missing), the files it replaces
directly in HOME (writable one by one while HOME stays closed), and the hosts it needs (allowed only
when the user names the profile with --profile). It is chosen from the command (`codex`, `npx
@openai/codex`, `node .../node_modules/@openai/codex/bin/codex.js`) or by name. `platform` never sees a
profile: it receives plain paths.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from jail.model import JailError

# Wrappers that run a package given by its name, and the subcommands that make a package manager one.
PACKAGE_RUNNERS = {"npx", "bunx", "pnpx"}
RUNNER_SUBCOMMANDS = {"npm": {"exec", "x"}, "pnpm": {"dlx", "exec"}, "yarn": {"dlx"}}
# Options of those wrappers that take a value (the package, for -p/--package).
RUNNER_VALUE_OPTIONS = {"-p", "--package", "-c", "--call", "--cache", "--registry", "--userconfig", "-w", "--workspace"}
# Interpreters whose first operand is the script that runs.
INTERPRETERS = {"node", "nodejs", "bun"}
INTERPRETER_VALUE_OPTIONS = {"-r", "--require", "--import", "--loader", "--experimental-loader"}
# Code given inline: there is no script to tell the agent from.
INTERPRETER_INLINE_OPTIONS = {"-e", "--eval", "-p", "--print"}
TOP_KEYS = {"description", "commands", "packages", "hosts", "state"}
STATE_KEYS = {"path", "env", "env_path", "home_files"}


@dataclass(frozen=True)
class StateFolder:
    """A folder the agent keeps its state in: `path` under HOME, unless `env` is set, which then names
    the folder itself or, with `env_path`, the folder it lies in. `home_files` are files directly in
    HOME (name -> what a missing one is created with); the agent keeps them in the folder instead when
    `env` is set."""

    path: str
    env: str = ""
    env_path: str = ""
    home_files: dict[str, str] = field(default_factory=dict)

    def folder(self, home: str, environ: dict[str, str]) -> str:
        moved = environ.get(self.env, "") if self.env else ""
        if moved:
            return os.path.abspath(os.path.join(os.path.expanduser(moved), self.env_path))
        return os.path.join(home, self.path)

    def files(self, home: str, environ: dict[str, str]) -> dict[str, str]:
        if self.env and environ.get(self.env):
            return {}
        return {os.path.join(home, name): content for name, content in self.home_files.items()}


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    commands: tuple[str, ...]
    packages: tuple[str, ...]
    hosts: tuple[str, ...]
    state: tuple[StateFolder, ...]

    def folders(self, home: str, environ: dict[str, str]) -> list[str]:
        """The state folders, absolute: writable in the jail, created (mode 0700) when missing."""
        return list(dict.fromkeys(state.folder(home, environ) for state in self.state))

    def home_files(self, home: str, environ: dict[str, str]) -> dict[str, str]:
        """Absolute path -> initial content of each file the agent replaces directly in HOME."""
        files: dict[str, str] = {}
        for state in self.state:
            files.update(state.files(home, environ))
        return files


def home_dir() -> str:
    """The HOME the command sees (it inherits jail's environment): where the profile's paths lie."""
    return os.path.expanduser("~")


def names() -> list[str]:
    """Every profile shipped with jail, sorted."""
    return sorted(entry.name[: -len(".toml")] for entry in _folder().iterdir() if entry.name.endswith(".toml"))


def load(name: str) -> Profile:
    """The profile NAME; raises JailError naming the known profiles when there is none."""
    if name not in names():
        raise JailError(f"no agent profile {name!r}; known profiles: {', '.join(names())}")
    import tomllib  # here: jail starts without it when no profile is loaded

    source = _folder() / f"{name}.toml"
    try:
        document = tomllib.loads(source.read_text(encoding="utf-8"))
        return _parse(name, document)
    except (tomllib.TOMLDecodeError, TypeError, ValueError) as exc:
        raise JailError(
            f"agent profile {name} ({source}) is broken: {exc}; known profiles: {', '.join(names())}"
        ) from None


def all_profiles() -> list[Profile]:
    return [load(name) for name in names()]


def detect(argv: list[str], which=None) -> Profile | None:
    """The profile of the agent ARGV runs, told from its name, the npm package a wrapper (npx, npm exec,
    node SCRIPT) runs, or where the command's file really lies (a link into node_modules/PACKAGE)."""
    argv = _without_env_prefix(argv)
    if not argv:
        return None
    if which is None:
        from shutil import which
    program = os.path.basename(argv[0])
    found = which(argv[0]) if "/" not in argv[0] else argv[0]
    location = os.path.realpath(found) if found else ""
    wrapper = program in PACKAGE_RUNNERS or program in RUNNER_SUBCOMMANDS or program in INTERPRETERS
    if not wrapper and program not in names() and "/node_modules/" not in location:
        return None  # the common case, told without parsing a profile (each file is named after its command)
    profiles = all_profiles()
    for candidate in (_by_command(profiles, program), _by_path(profiles, location)):
        if candidate is not None:
            return candidate
    if program in PACKAGE_RUNNERS:
        return _by_package_spec(profiles, argv[1:])
    if program in RUNNER_SUBCOMMANDS and len(argv) > 1 and argv[1] in RUNNER_SUBCOMMANDS[program]:
        return _by_package_spec(profiles, argv[2:])
    if program in INTERPRETERS:
        args = argv[1:]
        if INTERPRETER_INLINE_OPTIONS & set(args):
            return None
        script = _first_operand(args, INTERPRETER_VALUE_OPTIONS)
        if script == "run":  # `bun run SCRIPT`
            script = _first_operand(args[args.index("run") + 1 :], INTERPRETER_VALUE_OPTIONS)
        if script is not None and script != "-":
            return _by_path(profiles, os.path.realpath(script))
    return None


def _folder() -> Path:
    return Path(__file__).parent  # shipped as package data (pyproject: [tool.setuptools.package-data])


def _parse(name: str, document: dict) -> Profile:
    unknown = set(document) - TOP_KEYS
    if unknown:
        raise ValueError(f"unknown keys {', '.join(sorted(unknown))}")
    state = []
    for table in document.get("state", []):
        extra = set(table) - STATE_KEYS
        if extra or not isinstance(table.get("path"), str) or os.path.isabs(table["path"]):
            raise ValueError(f"each [[state]] needs a relative 'path' (and only {', '.join(sorted(STATE_KEYS))})")
        files = table.get("home_files", {})
        if not all(isinstance(v, str) and "/" not in k for k, v in files.items()):
            raise ValueError("home_files maps a file name in HOME to its initial text")
        state.append(StateFolder(table["path"], table.get("env", ""), table.get("env_path", ""), dict(files)))
    return Profile(
        name=name,
        description=str(document.get("description", name)),
        commands=_strings(document, "commands"),
        packages=_strings(document, "packages"),
        hosts=tuple(host.lower() for host in _strings(document, "hosts")),
        state=tuple(state),
    )


def _strings(document: dict, key: str) -> tuple[str, ...]:
    values = document.get(key, [])
    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
        raise ValueError(f"'{key}' must be a list of strings")
    return tuple(values)


def _without_env_prefix(argv: list[str]) -> list[str]:
    """`env [-i] [NAME=VALUE]... COMMAND`: the COMMAND part."""
    if argv and os.path.basename(argv[0]) == "env":
        rest = argv[1:]
        while rest and (rest[0].startswith("-") or "=" in rest[0]):
            rest = rest[1:]
        return rest
    return argv


def _by_command(profiles: list[Profile], program: str) -> Profile | None:
    return next((p for p in profiles if program in p.commands), None)


def _by_path(profiles: list[Profile], path: str) -> Profile | None:
    """The profile whose npm package holds PATH (`.../node_modules/@openai/codex/bin/codex.js`)."""
    parts = Path(path).parts
    for index, part in enumerate(parts[:-1]):
        if part != "node_modules":
            continue
        package = parts[index + 1]
        if package.startswith("@") and index + 2 < len(parts):
            package = f"{package}/{parts[index + 2]}"
        for profile in profiles:
            if package in profile.packages:
                return profile
    return None


def _by_package_spec(profiles: list[Profile], args: list[str]) -> Profile | None:
    """`npx [-y] [-p PKG] PKG[@VERSION] ...`: the profile of the package (or command) it runs."""
    specs = []
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--":
            specs += args[index + 1 : index + 2]
            break
        if arg.startswith("--package="):
            specs.append(arg.split("=", 1)[1])
        elif arg in ("-p", "--package") and index + 1 < len(args):
            specs.append(args[index + 1])
        if arg in RUNNER_VALUE_OPTIONS:
            index += 2
            continue
        if not arg.startswith("-"):
            specs.append(arg)
            break
        index += 1
    for spec in specs:
        package = _package_name(spec)
        for profile in profiles:
            if package in profile.packages or package in profile.commands:
                return profile
    return None


def _package_name(spec: str) -> str:
    """`@scope/name@1.2` -> `@scope/name`; `name@latest` -> `name`."""
    at = spec.find("@", 1)
    return spec[:at] if at > 0 else spec


def _first_operand(args: list[str], value_options: set[str]) -> str | None:
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--":
            return args[index + 1] if index + 1 < len(args) else None
        if arg in value_options:
            index += 2
            continue
        if not arg.startswith("-"):
            return arg
        index += 1
    return None
