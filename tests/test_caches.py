"""Package caches in the jail: real npm, pip and go against local registries (tests/registries), in weak,
strong and rootless modes. They work from the user's warm cache, the cache is byte-for-byte the same
afterwards, and what a jailed run writes into it (a poisoned entry) never reaches a later unjailed run."""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import jail
from jail.platform.caches import find_caches
from jail.platform.netns import strong_mode_unavailable
from jail.platform.rootless import rootless_unavailable
from tests.conftest import map_names, unmap_names
from tests.registries import GENUINE, GO_MODULE, NPM_PACKAGE, REGISTRY_ADDRESS, REGISTRY_NAME, WHEEL, Registry

USER = "jail-caches-test"
RULE = f"r.host === '{REGISTRY_NAME}'"
SYSTEM_PYTHON = "/usr/bin/python3"
HOSTS_LINE = f"{REGISTRY_ADDRESS} {REGISTRY_NAME}  # tests/test_caches.py"
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a test user, /etc/hosts; CI has it)")


# ---------------------------------------------------------------------------------------------------
# Which caches (no jail run)


def test_caches_found_where_variables_move_them_outermost_only(tmp_path):
    home = str(tmp_path / "home")
    os.makedirs(f"{home}/.npm")
    os.makedirs(f"{home}/.cache/pip")
    environ = {"PATH": "/nowhere", "GOPATH": f"{tmp_path}/gopath:/other", "CARGO_HOME": f"{tmp_path}/cargo"}
    found = find_caches([home], environ, which=lambda tool, path=None: tool in ("go", "cargo"))
    # ~/.cache/pip is inside ~/.cache; go's and cargo's are missing but their tools are there.
    assert found == (f"{home}/.npm", f"{home}/.cache", f"{tmp_path}/cargo", f"{tmp_path}/gopath/pkg")


def test_caches_that_hold_a_write_root_or_a_denied_path_are_left_alone(tmp_path):
    home = str(tmp_path)
    for name in (".npm", ".cache/project", ".m2/repository"):
        os.makedirs(f"{home}/{name}")
    avoid = (f"{home}/.cache/project", f"{home}/.m2/repository/secret")
    found = find_caches([home], {"PATH": "/nowhere"}, avoid=avoid, which=lambda tool, path=None: None)
    assert found == (f"{home}/.npm",)


def test_explain_lists_the_caches_and_how_they_are_written(tmp_path):
    (tmp_path / ".npm").mkdir()
    (tmp_path / "project").mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "JAIL_CA_DIR": str(tmp_path / "ca")}
    lines = {}
    for flags in ((), ("--keep-caches",)):
        out = subprocess.run(
            [sys.executable, "-m", "jail", "--explain", *flags, "--", "npm", "install"],
            env=env,
            capture_output=True,
            text=True,
            cwd=tmp_path / "project",
        )
        assert out.returncode == 0, out.stderr
        lines[flags] = next(line for line in out.stdout.splitlines() if "package caches" in line)
    assert "copy-on-write" in lines[()] and f"{tmp_path}/.npm" in lines[()]
    assert "written through (--keep-caches)" in lines[("--keep-caches",)]


# ---------------------------------------------------------------------------------------------------
# Real tools against local registries


@pytest.fixture(scope="module")
def registry(test_ca) -> Iterator[Registry]:
    if os.geteuid() != 0:
        pytest.skip("maps the registry's name in /etc/hosts, which needs root (CI has it)")
    _map_registry_name()
    server = Registry(test_ca)
    try:
        yield server
    finally:
        server.stop()
        unmap_names([HOSTS_LINE])


def _map_registry_name() -> None:
    """Add the registry's name to /etc/hosts (again before each run: a test run beside this one may edit it)."""
    map_names([HOSTS_LINE])


@pytest.fixture(scope="module")
def test_user() -> Iterator[pwd.struct_passwd]:
    created = False
    try:
        entry = pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", USER], check=True, capture_output=True)
        created, entry = True, pwd.getpwnam(USER)
    # The rootless jail runs jail's own interpreter as the user (a pyenv under /root is 700).
    needed = [Path(sys.executable), Path(sys.executable).resolve(), Path(jail.__file__).resolve().parent]
    needed += [Path(sysconfig.get_path(name)) for name in ("purelib", "platlib", "stdlib")]
    changed = _open_traversal(needed)
    try:
        yield entry
    finally:
        for directory, mode in reversed(changed):
            os.chmod(directory, mode)
        if created:
            subprocess.run(["userdel", USER], capture_output=True)


def _open_traversal(paths: list[Path]) -> list[tuple[Path, int]]:
    from tests.test_rootless import _open_traversal as open_traversal

    return open_traversal(paths)


@dataclass
class Workspace:
    """A real-looking HOME and a project folder beside it, used by one user in one mode."""

    mode: str
    base: Path
    registry: Registry
    ca_file: Path
    user: pwd.struct_passwd | None  # None: root

    @property
    def home(self) -> Path:
        return self.base / "home"

    @property
    def project(self) -> Path:
        return self.base / "project"

    @property
    def tmp(self) -> Path:
        """jail's temp dir (TMPDIR), where the run's layers are made."""
        return self.base / "tmp"

    def environment(self, jailed: bool) -> dict[str, str]:
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",  # strong mode needs ip, nft
            "HOME": str(self.home),
            "LANG": "C.UTF-8",
            "JAIL_CA_DIR": str(self.base / "jail-ca"),
            "TMPDIR": str(self.tmp),
            "npm_config_registry": self.registry.url("/"),
            "npm_config_audit": "false",
            "npm_config_fund": "false",
            "npm_config_update_notifier": "false",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "PIP_NO_INPUT": "1",
            "GOPROXY": self.registry.url("/go"),
            "GOSUMDB": "off",
        }
        if not jailed:  # in the jail, jail points these at its own bundle
            env.update(npm_config_cafile=str(self.ca_file), SSL_CERT_FILE=str(self.ca_file), PIP_CERT=str(self.ca_file))
        if jailed and self.mode == "strong":  # as `sudo jail ...` would: the command runs as the user
            env.update(SUDO_UID=str(self.user.pw_uid), SUDO_GID=str(self.user.pw_gid))
        return env

    def _as_user(self, argv: list[str]) -> list[str]:
        if self.user is None:
            return argv
        return ["setpriv", f"--reuid={self.user.pw_uid}", f"--regid={self.user.pw_gid}", "--clear-groups", "--", *argv]

    def plain(self, *argv: str) -> subprocess.CompletedProcess:
        """ARGV as the user, without jail."""
        return self._run(self._as_user(list(argv)), self.environment(jailed=False))

    def jail(
        self, *argv: str, flags: tuple[str, ...] = (), wrap: list[str] | None = None
    ) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "jail", "--upstream-ca", str(self.ca_file)]
        command += ["--allow-private", f"{REGISTRY_ADDRESS}/32", "--js", RULE, *flags]
        command += ["--weak"] if self.mode == "weak" else ["-v"]
        command += ["--", *argv]
        if self.mode == "rootless":
            command = self._as_user(command)
        return self._run([*(wrap or []), *command], self.environment(jailed=True))

    def _run(self, argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
        _map_registry_name()
        return subprocess.run(argv, env=env, cwd=self.project, capture_output=True, text=True, timeout=120)


MODES = ("weak", "strong", "rootless")


@pytest.fixture(params=MODES)
def workspace(request, registry, test_ca_file) -> Iterator[Workspace]:
    mode = request.param
    unavailable = {"strong": strong_mode_unavailable, "rootless": rootless_unavailable}.get(mode, lambda: None)()
    if unavailable:
        pytest.skip(f"{mode} mode unavailable: {unavailable}")
    user = request.getfixturevalue("test_user") if mode != "weak" else None
    base = Path(tempfile.mkdtemp(prefix="caches-test-"))
    for folder in ("home", "project", "jail-ca", "tmp"):
        (base / folder).mkdir()
    shutil.copy(test_ca_file, base / "ca.pem")
    if user is not None:
        for path in [base, *base.iterdir()]:
            os.chown(path, user.pw_uid, user.pw_gid)
    base.chmod(0o755)
    registry.clear()
    yield Workspace(mode, base, registry, base / "ca.pem", user)
    # Go makes its module folders read-only.
    subprocess.run(["chmod", "-R", "u+w", str(base)], capture_output=True)
    shutil.rmtree(base, ignore_errors=True)


@dataclass
class Tool:
    command: tuple[str, ...]
    cache: str  # under HOME
    prepare: Callable[[Workspace], None]
    reset: Callable[[Workspace], None]
    installed: Callable[[Workspace], str]  # what the package says, as installed in the project


def _npm_prepare(ws: Workspace) -> None:
    name, version = NPM_PACKAGE
    _write(ws, "package.json", json.dumps({"name": "project", "version": "1.0.0", "dependencies": {name: version}}))


def _npm_reset(ws: Workspace) -> None:
    shutil.rmtree(ws.project / "node_modules", ignore_errors=True)
    (ws.project / "package-lock.json").unlink(missing_ok=True)


def _pip_prepare(ws: Workspace) -> None:
    # Debian's pip (a system site package) installs into the project's own venv.
    made = ws.plain(SYSTEM_PYTHON, "-m", "venv", "--without-pip", "--system-site-packages", ".venv")
    assert made.returncode == 0, made.stderr


def _pip_installed(ws: Workspace) -> str:
    found = list(ws.project.glob(f".venv/lib/python3*/site-packages/{WHEEL[0]}/__init__.py"))
    return found[0].read_text() if found else ""


def _go_prepare(ws: Workspace) -> None:
    module, version = GO_MODULE
    _write(ws, "go.mod", f"module project\n\ngo 1.19\n\nrequire {module} {version}\n")


def _go_installed(ws: Workspace) -> str:
    module, version = GO_MODULE
    return (ws.home / "go/pkg/mod" / f"{module}@{version}" / "tiny.go").read_text()


def _write(ws: Workspace, name: str, text: str) -> None:
    path = ws.project / name
    path.write_text(text)
    if ws.user is not None:
        os.chown(path, ws.user.pw_uid, ws.user.pw_gid)


TOOLS = {
    "npm": Tool(
        ("npm", "install"),
        ".npm",
        _npm_prepare,
        _npm_reset,
        lambda ws: (ws.project / "node_modules" / NPM_PACKAGE[0] / "index.js").read_text(),
    ),
    "pip": Tool(
        (".venv/bin/python", "-m", "pip", "install", "--force-reinstall", "--index-url", "{simple}", WHEEL[0]),
        ".cache/pip",
        _pip_prepare,
        lambda ws: None,
        _pip_installed,
    ),
    "go": Tool(("go", "mod", "download", GO_MODULE[0]), "go", _go_prepare, lambda ws: None, _go_installed),
}


def _tool(ws: Workspace, name: str) -> tuple[Tool, tuple[str, ...]]:
    tool = TOOLS[name]
    program = {"npm": "npm", "go": "go", "pip": SYSTEM_PYTHON}[name]
    if shutil.which(program) is None:
        pytest.skip(f"{program} is not installed (.ci/run installs it)")
    if name == "pip" and subprocess.run([SYSTEM_PYTHON, "-m", "pip", "--version"], capture_output=True).returncode:
        pytest.skip("Debian's python3-pip is not installed (.ci/run installs it)")
    command = tuple(arg.replace("{simple}", ws.registry.url("/simple/")) for arg in tool.command)
    return tool, command


def tree_digest(root: Path) -> dict[str, str]:
    """Every entry under ROOT: its type, mode, owner and content (or link target)."""
    digest = {}
    for folder, subfolders, files in os.walk(root):
        for name in subfolders + files:
            path = os.path.join(folder, name)
            info = os.lstat(path)
            kind = "l" if os.path.islink(path) else "d" if os.path.isdir(path) else "f"
            content = os.readlink(path) if kind == "l" else ""
            if kind == "f":
                with open(path, "rb") as handle:
                    content = hashlib.sha256(handle.read()).hexdigest()
            digest[os.path.relpath(path, root)] = f"{kind} {info.st_mode:o} {info.st_uid} {content}"
    return digest


def _warm(ws: Workspace, name: str) -> tuple[Tool, tuple[str, ...]]:
    """Prepare the project and fill the user's cache with an unjailed run."""
    tool, command = _tool(ws, name)
    tool.prepare(ws)
    warm = ws.plain(*command)
    assert warm.returncode == 0, warm.stdout + warm.stderr
    assert ws.registry.downloads(), "the unjailed run downloaded nothing: the test proves nothing"
    assert GENUINE in tool.installed(ws)
    return tool, command


@pytest.mark.parametrize("name", list(TOOLS))
def test_tool_runs_from_the_warm_cache_and_leaves_it_unchanged(workspace, name):
    tool, command = _warm(workspace, name)
    before = tree_digest(workspace.home / tool.cache)
    for _ in range(2):  # the second jailed run still starts from the user's warm cache
        workspace.registry.clear()
        tool.reset(workspace)
        result = workspace.jail(*command)
        assert result.returncode == 0, result.stdout + result.stderr
        assert workspace.mode == "weak" or f"{workspace.mode} mode" in result.stderr
        assert "caches:" not in result.stderr  # no fallback
        assert workspace.registry.downloads() == []
        assert GENUINE in tool.installed(workspace)
        assert tree_digest(workspace.home / tool.cache) == before
    assert list(workspace.tmp.iterdir()) == []  # the run's layer is gone, read-only module folders and all


POISON = """
import ctypes, glob, json, os
home = os.environ["HOME"]
done = {}
def attempt(name, action):
    try:
        action()
        done[name] = "ok"
    except OSError as exc:
        done[name] = type(exc).__name__
def poison_npm():
    for path in glob.glob(home + "/.npm/_cacache/content-v2/**/*", recursive=True):
        if os.path.isfile(path):
            with open(path, "wb") as handle:
                handle.write(b"poisoned")
    open(home + "/.npm/POISON", "w").close()
def poison_pip():
    os.makedirs(home + "/.cache/pip/wheels/poison", exist_ok=True)
    with open(home + "/.cache/pip/wheels/poison/tinywheel-1.0-py3-none-any.whl", "w") as handle:
        handle.write("poisoned")
def layer():
    # The run's layer is a sibling of its private temp dir.
    layers = glob.glob(os.path.dirname(os.environ["TMPDIR"]) + "/jail-*-caches-*")
    for path in layers:
        open(path + "/POISON", "w").close()
    if not layers:
        raise FileNotFoundError("no layer found")
def umount():
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2((home + "/.npm").encode(), 2) != 0:
        raise OSError(ctypes.get_errno(), "umount2")
attempt("npm", poison_npm)
attempt("pip", poison_pip)
attempt("layer", layer)
attempt("umount", umount)
print(json.dumps(done))
"""


def test_a_poisoned_entry_written_in_the_jail_never_reaches_the_real_cache(workspace):
    npm, npm_command = _warm(workspace, "npm")
    _warm(workspace, "pip")
    before = {cache: tree_digest(workspace.home / cache) for cache in (".npm", ".cache")}
    result = workspace.jail(SYSTEM_PYTHON, "-c", POISON)
    assert result.returncode == 0, result.stderr
    # Inside, the writes succeed (the tools need that); the layer and the mount are out of reach.
    outcome = json.loads(result.stdout)
    assert (outcome["npm"], outcome["pip"], outcome["umount"]) == ("ok", "ok", "PermissionError")
    assert outcome["layer"] == "PermissionError"
    assert {cache: tree_digest(workspace.home / cache) for cache in (".npm", ".cache")} == before
    assert not (workspace.home / ".npm/POISON").exists()
    # A later unjailed run installs the genuine package, from the cache.
    workspace.registry.clear()
    npm.reset(workspace)
    after = workspace.plain(*npm_command, "--offline")
    assert after.returncode == 0, after.stderr
    assert GENUINE in npm.installed(workspace) and workspace.registry.downloads() == []


# As inside a container: jail's temp dir is on an overlayfs, which cannot hold another overlay's upper layer.
TMP_ON_OVERLAY = 'mkdir "$0/u" "$0/w" && mount -t overlay overlay -o "lowerdir=$0/l,upperdir=$0/u,workdir=$0/w" "$1"'


@pytest.mark.parametrize("workspace", ["weak"], indirect=True)
def test_without_an_overlay_the_cache_is_private_and_empty(workspace):
    npm, command = _warm(workspace, "npm")
    before = tree_digest(workspace.home / npm.cache)
    (workspace.base / "overlay" / "l").mkdir(parents=True)
    script = f'{TMP_ON_OVERLAY} && shift && exec "$@"'
    wrap = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(workspace.base / "overlay")]
    wrap.append(str(workspace.tmp))
    workspace.registry.clear()
    npm.reset(workspace)
    result = workspace.jail(*command, wrap=wrap)
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if "caches:" in line]
    assert len(notes) == 1 and "refused a copy-on-write overlay" in notes[0], result.stderr
    # A cold, private cache: the tarball is downloaded again, and the user's cache is untouched.
    assert workspace.registry.downloads() == [f"/{NPM_PACKAGE[0]}/-/{NPM_PACKAGE[0]}-{NPM_PACKAGE[1]}.tgz"]
    assert GENUINE in npm.installed(workspace)
    assert tree_digest(workspace.home / npm.cache) == before


@pytest.mark.parametrize("workspace", ["weak"], indirect=True)
def test_a_missing_cache_is_made_for_the_run_only_and_keep_caches_writes_through(workspace):
    npm, command = _tool(workspace, "npm")
    npm.prepare(workspace)
    assert not (workspace.home / ".npm").exists()
    result = workspace.jail(*command)
    assert result.returncode == 0, result.stderr
    # Made to lay the overlay on, and removed again: the run's writes went to its own layer.
    assert not (workspace.home / ".npm").exists()
    assert not any(workspace.home.glob(".m2")) and not any(workspace.home.glob("go"))
    npm.reset(workspace)
    result = workspace.jail(*command, flags=("--keep-caches",))
    assert result.returncode == 0, result.stderr
    # Written through: an unjailed run now installs from the cache alone.
    workspace.registry.clear()
    npm.reset(workspace)
    offline = workspace.plain(*command, "--offline")
    assert offline.returncode == 0, offline.stderr
    assert workspace.registry.downloads() == [] and GENUINE in npm.installed(workspace)
