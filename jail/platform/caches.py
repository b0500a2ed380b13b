"""The package managers' caches, copy-on-write for the jailed command.

`npm install` needs ~/.npm writable, `cargo fetch` ~/.cargo, `go mod download` ~/go/pkg, pip ~/.cache/pip.
Opening those folders for writing would let a jailed run plant a poisoned entry (a wheel pip built, a
tarball under a known integrity) that a later, unjailed run trusts. So each cache is shown copy-on-write:

- In the launcher's private mount namespace, each cache is an overlayfs mount on its own path: the
  lower layer is the real cache (reads see the user's warm cache), the upper layer a folder of the run's
  own (`jail-<id>-caches-*` in the temp dir, made by jail and removed at the end with the run's other
  temp dirs). Landlock gives write rights on the mounted path only, so writes land in the run's layer,
  never in the cache, and the layer itself is out of the command's reach.
- `--keep-caches`: no overlay; the real cache is writable (written through). The run's downloads stay,
  and so would anything it poisons: that protection is given up.
- A cache folder that does not exist yet is made (empty, owned like the folder it is made in) when its
  tool is on PATH, so there is something to lay the overlay on; unjailed, the tool would make it anyway.
  Without the tool nothing is made, and nothing is shown.
- Where the kernel refuses the overlay (its upper layer on an overlayfs, as inside a container; a kernel
  without unprivileged overlay), a private empty folder is bind-mounted over each cache instead: the tools
  work, from a cold cache. Where no mount namespace can be made at all, the caches a variable can move
  (npm_config_cache, XDG_CACHE_HOME, GOMODCACHE, ...) point into the private folder and the others stay
  read-only. Either way one line on stderr says so.

The launcher imports this module (only when there are caches), so it needs the standard library alone.
"""

from __future__ import annotations

import ctypes
import os
import sys

# Each cache: its folder under HOME, the variables that move it (the first one set wins; the value's
# first PATH-like element, plus a sub-folder), and the tool that makes it ("" for the XDG cache, which
# almost everything uses: pip, yarn 1, pnpm's metadata, go-build, uv, poetry, deno, node-gyp, ...).
# Cargo, rustup and Gradle write lock and state files beside their caches, so their whole homes are shown.
KNOWN_CACHES: tuple[tuple[str, tuple[tuple[str, str], ...], str], ...] = (
    (".npm", (("npm_config_cache", ""), ("NPM_CONFIG_CACHE", "")), "npm"),
    (".cache", (("XDG_CACHE_HOME", ""),), ""),
    (".cache/pip", (("PIP_CACHE_DIR", ""),), "pip"),
    (".cache/go-build", (("GOCACHE", ""),), "go"),
    (".cache/yarn", (("YARN_CACHE_FOLDER", ""),), "yarn"),
    (".yarn", (), "yarn"),
    (".pnpm-store", (), "pnpm"),
    (".local/share/pnpm", (("PNPM_HOME", ""),), "pnpm"),
    (".bun/install/cache", (("BUN_INSTALL_CACHE_DIR", ""),), "bun"),
    (".cargo", (("CARGO_HOME", ""),), "cargo"),
    (".rustup", (("RUSTUP_HOME", ""),), "rustup"),
    ("go/pkg", (("GOMODCACHE", ""), ("GOPATH", "pkg")), "go"),
    (".m2/repository", (), "mvn"),
    (".gradle", (("GRADLE_USER_HOME", ""),), "gradle"),
    (".ivy2/cache", (), "sbt"),
    (".nuget/packages", (("NUGET_PACKAGES", ""),), "dotnet"),
    (".pub-cache", (("PUB_CACHE", ""),), "dart"),
    (".cabal/packages", (), "cabal"),
)
# Variables that move a cache and nothing else: without a mount namespace they point into the private
# folder (CARGO_HOME, RUSTUP_HOME or GRADLE_USER_HOME would also hide the user's settings and toolchains).
FALLBACK_VARIABLES = (
    "npm_config_cache",
    "XDG_CACHE_HOME",
    "PIP_CACHE_DIR",
    "GOCACHE",
    "GOMODCACHE",
    "YARN_CACHE_FOLDER",
    "BUN_INSTALL_CACHE_DIR",
    "NUGET_PACKAGES",
)


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


# ---------------------------------------------------------------------------------------------------
# Which caches (in jail's process)


def cache_location(home: str, relative: str, variables, environ: dict[str, str] | None) -> str:
    """Where one cache lives: where a variable set in ENVIRON moves it, else under HOME."""
    for name, sub in variables if environ is not None else ():
        value = environ.get(name, "").split(os.pathsep)[0]
        if os.path.isabs(value):
            return os.path.normpath(os.path.join(value, sub))
    return os.path.join(home, relative)


def find_caches(
    homes: list[str],
    environ: dict[str, str],
    avoid: tuple[str, ...] = (),
    which=None,
    exists=os.path.isdir,
) -> tuple[str, ...]:
    """The cache folders to show copy-on-write, outermost only: those that exist, and those whose tool is
    on PATH. The variables in ENVIRON move the first home's caches (they are jail's, and the command's,
    environment). A cache that holds or is held by one of the AVOID paths (write roots, unreadable paths)
    is left as it is: a write root must stay written through, an unreadable path unreadable."""
    if which is None:
        from shutil import which
    found: list[str] = []
    for index, home in enumerate(homes):
        for relative, variables, tool in KNOWN_CACHES:
            path = os.path.realpath(cache_location(home, relative, variables, environ if index == 0 else None))
            if exists(path) or not tool or which(tool, path=environ.get("PATH")):
                found.append(path)
    avoided = [os.path.realpath(a) for a in avoid]
    found = [p for p in found if not any(_within(p, a) or _within(a, p) for a in avoided)]
    outermost = [p for p in found if not any(_within(p, other) and p != other for other in found)]
    return tuple(dict.fromkeys(outermost))


def make_layer(jail_id: str) -> str:
    """The run's private folder for the caches' upper layers, named from the jail id (the session removes
    every folder so named when it ends). Owned by jail, who mounts the overlays (the launcher runs as jail's
    user); the command never gets write rights on it."""
    import tempfile

    return tempfile.mkdtemp(prefix=f"jail-{jail_id}-caches-")


# ---------------------------------------------------------------------------------------------------
# Showing them (in the launcher)

_libc = None


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> int:
    """mount(2); 0 or the errno."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    encode = os.fsencode
    if _libc.mount(
        encode(source), encode(target), fstype and encode(fstype), ctypes.c_ulong(flags), data and encode(data)
    ):
        return ctypes.get_errno()
    return 0


def _escape(path: str) -> str:
    """A path as an overlayfs option value (`,` separates options and `:` lower layers)."""
    return path.replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")


def _in_initial_user_namespace() -> bool:
    """Trusted xattrs (overlayfs' default) need it; elsewhere overlayfs must keep its marks in user xattrs,
    or removing a folder of the lower layer fails with EIO."""
    try:
        with open("/proc/self/uid_map") as handle:
            return handle.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return False


def _make_missing(path: str, made: list[str]) -> bool:
    """Make PATH and its missing parents, each owned like the folder it is made in (each one made is added
    to MADE); False if it cannot."""
    missing = []
    parent = path
    while not os.path.lexists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    try:
        owner = os.stat(parent)
        for folder in reversed(missing):
            os.mkdir(folder, 0o700)
            made.append(folder)
            if os.geteuid() == 0:
                os.chown(folder, owner.st_uid, owner.st_gid)
        return os.path.isdir(path)
    except OSError:
        return False


# In the run's layer: the cache folders the launcher made, so that jail removes those still empty at the end.
MADE_LIST = "made-folders"


def _remember_made(layer: str | None, made: list[str]) -> None:
    if layer is not None and made:
        with open(os.path.join(layer, MADE_LIST), "a") as handle:
            handle.writelines(folder + "\0" for folder in made)


def remove_empty_made_folders(jail_id: str) -> None:
    """Leave HOME as the run found it: the cache folders made only to lay an overlay on, still empty once
    the run is over (nothing was written through), are removed, deepest first."""
    import contextlib
    import glob
    import tempfile

    for layer in glob.glob(os.path.join(glob.escape(tempfile.gettempdir()), f"jail-{jail_id}-caches-*")):
        try:
            with open(os.path.join(layer, MADE_LIST)) as handle:
                made = [folder for folder in handle.read().split("\0") if folder]
        except OSError:
            continue
        for folder in sorted(made, key=lambda path: path.count("/"), reverse=True):
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # only ever an empty folder


def _private_folder(layer: str, index: int, name: str, like: os.stat_result | None = None) -> str:
    """A new folder in the run's layer; owned like LIKE, as the cache's root takes its owner and mode from
    it (an overlay's root from its upper layer's, a bind mount's from its source's)."""
    path = os.path.join(layer, str(index), name)
    os.makedirs(path, 0o700)
    if like is not None:
        if os.geteuid() == 0 and like.st_uid != OVERFLOW_ID:
            os.chown(path, like.st_uid, like.st_gid)
        os.chmod(path, like.st_mode & 0o7777)
    return path


MS_BIND = 4096
# The owner a user namespace shows for ids it does not map: it cannot be given to a new file.
OVERFLOW_ID = 65534


def show_caches(caches: tuple[str, ...], layer: str | None, keep: bool, namespace: bool) -> list[str]:
    """Make each cache writable for the command, copy-on-write unless KEEP; returns the folders to give
    write rights to. NAMESPACE: the launcher is in a private mount namespace."""
    made: list[str] = []
    present = [path for path in caches if os.path.isdir(path) or _make_missing(path, made)]
    if keep or not present:
        return present  # written through: what the run put in a new folder stays, and so does the folder
    _remember_made(layer, made)
    if layer is None:
        print("jail: caches: no private layer for this run; the caches stay read-only", file=sys.stderr)
        return []
    if not namespace:
        return _relocate(present, layer)
    options = "" if _in_initial_user_namespace() else ",userxattr"
    shown: list[str] = []
    refused = 0
    for index, path in enumerate(present):
        try:
            lower = os.stat(path)
            if not refused:
                upper = _private_folder(layer, index, "upper", lower)
                work = _private_folder(layer, index, "work")
                data = f"lowerdir={_escape(path)},upperdir={_escape(upper)},workdir={_escape(work)}{options}"
                refused = _mount("overlay", path, "overlay", 0, data)
            if refused:
                # The kernel's answer for one is its answer for all: the rest get a private empty folder too.
                bind_error = _mount(_private_folder(layer, index, "empty", lower), path, None, MS_BIND, None)
                if bind_error:
                    raise OSError(bind_error, os.strerror(bind_error))
            shown.append(path)
        except OSError as exc:  # left read-only, as without jail's help
            print(f"jail: caches: {path} stays read-only: {exc.strerror}", file=sys.stderr)
    if refused:
        print(
            f"jail: caches: the kernel refused a copy-on-write overlay ({os.strerror(refused)}); package caches"
            " start empty and private to this run",
            file=sys.stderr,
        )
    return shown


def _relocate(caches: list[str], layer: str) -> list[str]:
    """Without a mount namespace: the variables that move a cache point into the private layer."""
    home = os.path.expanduser("~")
    moved = []
    for relative, variables, _ in KNOWN_CACHES:
        path = os.path.realpath(cache_location(home, relative, variables, dict(os.environ)))
        variable = next((name for name, sub in variables if name in FALLBACK_VARIABLES and not sub), None)
        if variable and any(_within(path, cache) for cache in caches):
            os.environ[variable] = os.path.join(layer, variable)
            os.makedirs(os.environ[variable], 0o700, exist_ok=True)
            moved.append(variable)
    print(
        f"jail: caches: no mount namespace for copy-on-write caches; {', '.join(moved) or 'no variable'} point"
        " into an empty private folder, the other caches stay read-only",
        file=sys.stderr,
    )
    return [os.path.join(layer, variable) for variable in moved]
