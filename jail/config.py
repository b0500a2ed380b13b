"""Config files: the flags' settings, kept in the repository or in the user's own folder.

`jail.toml` in the current folder (or `--config FILE`) is the project file; `config.toml` in
`$XDG_CONFIG_HOME/jail/` (`~/.config/jail/` without it) is the user file. Their keys are the flags'
long names without the dashes (`js`, `js-file`, `policy`, `allow-write`, `secret`, `audit-log`, ...),
taken from the click command itself, so every new flag is a setting too. A value has the flag's type: a
string, a number, `true`/`false` for an on/off flag, a list for a flag that can be repeated (one value
is read as a list of one). A relative path is relative to the folder of the file it is written in.

Flags win over the project file, the project file over the user file; a list is replaced, never
appended to. Some settings are one choice (the rule: `js`, `js-file`, `sh`, `proc` or `policy`; the
profile: `profile` or `no-profile`; writing: `read-only` or `allow-write`): the source with the highest
precedence that makes the choice makes it, and what lower ones chose is dropped (and said by --explain).

Files are read by click's `default_map`, so a setting from a file is checked and converted exactly as
the flag would be. Every mistake is one JailError `FILE:LINE: what is wrong`.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from jail.model import JailError

PROJECT_FILE = "jail.toml"
# Flags that are actions or belong to one invocation, not settings a file keeps.
NOT_SETTINGS = frozenset(
    {
        "config",
        "no-config",
        "cleanup",
        "explain",
        "server",
        "listen",
        "listen-public",
        "ready-file",
        "test",
        "test-url",
        "test-method",
        "clients",
        "require-client",
        "workers",
        "ask-fd",
        "help",
        "version",
    }
)
# A project's `jail.toml` comes with the repository, so whoever wrote the repository wrote it: it may set
# the rule (a team's rules live there), never what hands out the user's secrets, weakens the jail, or sends
# the run's records elsewhere. These only come from flags or the user's own file.
USER_ONLY = frozenset(
    {
        "secret",
        "secret-file",
        "upstream-proxy",
        "upstream-ca",
        "allow-private",
        "allow-unix-socket",
        "no-fs-restrictions",
        "weak",
        "allow-weak",
        "keep-caches",
        "otlp-endpoint",
        "user",
        "ssh-agent",
    }
)
# Files a project's `jail.toml` may have written or opened for writing: only inside the project's folder.
WRITTEN_PATHS = frozenset({"allow-write", "audit-log", "request-log", "har", "ask-save"})
# Settings that are one choice between several flags (see the module docstring).
ONE_CHOICE = (
    ("js", "js-file", "sh", "proc", "policy"),
    ("profile", "no-profile"),
    ("read-only", "allow-write"),
)


def user_config_file(environ: Mapping[str, str]) -> Path:
    base = environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "jail" / "config.toml"


def setting_name(option: click.Parameter) -> str:
    """`--js-file` is `js-file`: the flag's long name without the dashes."""
    longest = max((opt for opt in option.opts if opt.startswith("--")), key=len, default=option.opts[0])
    return longest.lstrip("-")


def settings_of(command: click.Command) -> dict[str, click.Option]:
    """Every flag of the command a config file may set, by setting name."""
    options = (param for param in command.params if isinstance(param, click.Option))
    return {
        setting_name(option): option
        for option in options
        if not option.hidden and option.expose_value and setting_name(option) not in NOT_SETTINGS
    }


@dataclass(frozen=True)
class Setting:
    name: str
    value: Any
    where: str  # FILE:LINE


@dataclass
class ConfigLayers:
    """What the config files say, merged under the flags given on the command line."""

    files: tuple[Path, ...] = ()
    # By click parameter name: the value for click's default_map, and where it was written.
    chosen: dict[str, Setting] = field(default_factory=dict)
    # Settings a higher source replaced as a whole choice (the rule, the profile, ...), said by --explain.
    overridden: list[str] = field(default_factory=list)
    # Looked for and missing (a file the command creates during the run is warned of).
    absent: tuple[Path, ...] = ()

    @property
    def default_map(self) -> dict[str, Any]:
        return {name: setting.value for name, setting in self.chosen.items()}


def load_layers(
    command: click.Command,
    ctx: click.Context,
    project: Path | None,
    user: Path | None,
    on_command_line: set[str],
) -> ConfigLayers:
    """Read the user file, then the project file (either may be None or missing: no settings), and drop
    every choice the command line makes itself."""
    options = settings_of(command)
    layers = ConfigLayers()
    for path in (user, project):
        if path is None:
            continue
        if not path.exists():
            layers.absent += (path.absolute(),)
        if not path.is_file():
            continue
        layers.files += (path.absolute(),)
        settings = read_file(path, options, ctx, from_project=path is project)
        # `read-only = false` makes no choice.
        _choose(
            layers,
            {setting.name for setting in settings if setting.value is not False},
            options,
            by=str(path.absolute()),
        )
        layers.chosen.update((options[setting.name].name, setting) for setting in settings)
    flags = {setting_name(option) for option in options.values() if option.name in on_command_line}
    _choose(layers, flags, options, by="the command line")
    return layers


def _choose(layers: ConfigLayers, given: set[str], options: dict[str, click.Option], by: str) -> None:
    """A source that makes one of the ONE_CHOICE choices replaces whatever lower sources chose there."""
    for group in ONE_CHOICE:
        made = [name for name in group if name in given]
        if not made:
            continue
        for name in group:
            earlier = layers.chosen.pop(options[name].name, None) if name in options else None
            if earlier is not None:
                layers.overridden.append(f"{name} from {earlier.where} is replaced by {made[0]} from {by}")


def read_file(
    path: Path, options: dict[str, click.Option], ctx: click.Context, from_project: bool = False
) -> list[Setting]:
    # policy_file's TOML position helpers: one scanner of key lines for every TOML file jail reads.
    # Imported here: a run without config files loads no TOML parser.
    from jail.policies.policy_file import Locator, read_toml

    name = str(path.absolute())
    text, document = read_toml(path, name, "config file")
    where = Locator(text)
    settings = []
    for key, value in sorted(document.items(), key=lambda item: where.line(key=item[0])):
        line = where.line(key=key)
        option = options.get(key)
        if option is None:
            raise JailError(f"{name}:{line}: {_unknown(key, options)}")
        try:
            converted = _value(value, option, path.absolute().parent, ctx)
        except (ValueError, click.BadParameter) as exc:
            raise JailError(f"{name}:{line}: '{key}': {exc}") from None
        if from_project:
            _check_project_setting(key, converted, path.absolute().parent, f"{name}:{line}")
        settings.append(Setting(key, converted, f"{name}:{line}"))
    for group in ONE_CHOICE:
        made = [setting for setting in settings if setting.name in group and setting.value is not False]
        if len(made) > 1:
            first, second = made[0], made[1]
            raise JailError(
                f"{second.where}: '{second.name}' and '{first.name}' (at {first.where}) are one choice: set one"
            )
    return settings


def _check_project_setting(key: str, value: Any, folder: Path, where: str) -> None:
    """Refuse what a repository's own `jail.toml` must not decide for the user who runs jail in it."""
    if key in USER_ONLY and value not in (False, [], None):
        raise JailError(
            f"{where}: '{key}' is not taken from a project's jail.toml (the repository's author would decide it"
            " for you): pass the flag, or set it in your own ~/.config/jail/config.toml"
        )
    if key in WRITTEN_PATHS:
        for item in value if isinstance(value, list) else [value]:
            resolved = os.path.realpath(item)
            if not (resolved == str(folder.resolve()) or resolved.startswith(str(folder.resolve()) + os.sep)):
                raise JailError(f"{where}: '{key}' = {item!r} lies outside the project's folder {folder}")


def _unknown(key: str, options: dict[str, click.Option]) -> str:
    close = difflib.get_close_matches(key.replace("_", "-"), options, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"unknown setting '{key}' ({hint}settings are the flags' names without dashes: {', '.join(sorted(options))})"


def _value(value: Any, option: click.Option, folder: Path, ctx: click.Context) -> Any:
    """The value for click's default_map: typed as the flag, relative paths made absolute; raises
    ValueError or click.BadParameter saying what is wrong."""
    if option.count:
        if type(value) is not int or value < 0:
            raise ValueError(f"must be a count (0, 1, 2...), not {_show(value)}")
        return value
    if option.is_flag:
        if type(value) is not bool:
            raise ValueError(f"must be true or false, not {_show(value)}")
        return value
    if option.multiple:
        items = value if isinstance(value, list) else [value]
        return [_item(item, option, folder, ctx) for item in items]
    return _item(value, option, folder, ctx)


def _item(value: Any, option: click.Option, folder: Path, ctx: click.Context) -> Any:
    if isinstance(option.type, click.types.FloatParamType):
        if type(value) not in (int, float):
            raise ValueError(f"must be a number, not {_show(value)}")
    elif isinstance(option.type, click.types.IntParamType):
        if type(value) is not int:
            raise ValueError(f"must be an integer, not {_show(value)}")
    elif not isinstance(value, str):
        raise ValueError(f"must be a string, not {_show(value)}")
    else:
        value = _relative_to(folder, value, option)
    option.type.convert(value, option, ctx)  # the flag's own check (a file that must exist, a range)
    return value


def _relative_to(folder: Path, value: str, option: click.Option) -> str:
    """A path in a file is relative to the file's folder, not to where jail is started."""
    if isinstance(option.type, click.Path) or option.metavar == "PATH":
        return str(folder / os.path.expanduser(value)) if value else value
    if option.metavar == "NAME=PATH":
        name, sep, path = value.partition("=")
        return f"{name}={folder / os.path.expanduser(path)}" if sep and path else value
    return value


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return str(value)


def origins(ctx: click.Context, layers: ConfigLayers) -> tuple[tuple[str, str], ...]:
    """(flag, where) for every setting given on the command line ("flag") or by a file ("FILE:LINE")."""
    found = []
    for name, option in settings_of(ctx.command).items():
        source = ctx.get_parameter_source(option.name)
        if source is ParameterSource.COMMANDLINE:
            found.append((f"--{name}", "flag"))
        elif source is ParameterSource.DEFAULT_MAP and option.name in layers.chosen:
            found.append((f"--{name}", layers.chosen[option.name].where))
    return tuple(found)


class ConfiguredCommand(click.Command):
    """A click command whose defaults come from the config files: `--config FILE` and `--no-config` are
    looked for first (by click's own parser, so `--` and option values are respected), the files are
    read, and their settings become the defaults the flags then override."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        given, _, _ = self.make_parser(ctx).parse_args(args=list(args))
        help_option = self.get_help_option(ctx)
        if given.get("version") or (help_option is not None and given.get(help_option.name)):
            return super().parse_args(ctx, args)  # help and version read no file, so a broken one cannot hide them
        if given.get("no_config"):
            if given.get("config") is not None:
                raise click.UsageError("--config and --no-config contradict each other")
            layers = ConfigLayers()
        else:
            explicit = given.get("config")
            project = Path(explicit) if explicit is not None else Path(PROJECT_FILE)
            if explicit is not None and not project.is_file():
                raise JailError(f"--config: no file {project}")
            layers = load_layers(self, ctx, project, user_config_file(os.environ), set(given))
        ctx.meta["jail.config"] = layers
        ctx.default_map = {**(ctx.default_map or {}), **layers.default_map}
        return super().parse_args(ctx, args)
