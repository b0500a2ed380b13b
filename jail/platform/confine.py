"""Filesystem confinement for the jailed command: Landlock, read-only bind mounts and a seccomp filter.

jail does not confine itself: it puts a small launcher in front of the command,

    python -I -S -c 'import this module from its folder; main()' --write DIR --deny PATH ... -- CMD ARGS...

which applies the restrictions to its own process and then exec's CMD; Landlock domains, seccomp filters
and mount namespaces are inherited across exec and fork and survive setuid. The launcher runs on every
jail start, so it is kept lean: the module is imported (its bytecode is cached, unlike a script's), without
site-packages (-S), and its import needs neither json nor dataclasses (the policy travels as plain
arguments): the command starts ~25 ms sooner.

What is enforced (Landlock is an allow-list, so "everything but X" is built by walking from `/`):

- Reading: every top-level entry of `/` gets read+execute, except on the way to a denied path: there
  jail descends, granting read to each sibling, and a directory on the way keeps only READ_DIR (names
  in it can be listed; a denied folder's file names can therefore be listed, never read). Files created
  later directly in such a directory (e.g. a new file in $HOME) are not readable. Denied paths are also
  never writable, wherever they are.
- Writing: only below the write roots (the current directory or --allow-write, and a private temp dir),
  plus the terminal and /dev/null-like devices. Everything else is read-only (Landlock also forbids the
  child any mount, umount or pivot_root).
- Protected paths (`.git/hooks`, `.git/config`, shell rc files, --protect): Landlock rights on a
  directory apply to everything below it and rights only add up, so Landlock alone cannot keep
  `.git/hooks` read-only while the folder around it is writable. jail therefore makes each existing
  protected path inside a write root a read-only bind mount in a private mount namespace (root, or an
  unprivileged user namespace otherwise) and every directory from the write root down to it a mount
  point, so none of them can be renamed, replaced or removed (EBUSY) and nothing can be created in or
  written to them (EROFS); symlinks, hard links and renames into them fail too. A missing `.git/hooks`
  (or `.git/config`) is created empty first (what `git init` makes), so it is protected the same way. Any
  other protected path that does not exist is protected by Landlock alone: its parent directory (and
  every directory from the write root down to it) gets no write rights of its own, only the existing
  entries in it stay writable; so nothing new can be created directly in those directories. That is the
  limitation accepted. When no mount namespace can be made, every protected path is handled that way.
- Unix sockets: Landlock (ABI 7) does not govern connect() to a path socket (it checks open(), not the
  socket's inode permission), so without --allow-unix-socket a seccomp filter makes socket(AF_UNIX, ...)
  fail with EACCES (socketpair() still works: it cannot reach anything) and io_uring_setup fail with
  ENOSYS (io_uring could open sockets past seccomp). With --allow-unix-socket the filter is not installed:
  every path socket the user may open becomes reachable, not only the listed ones (the kernel cannot
  say "this socket only"). Abstract sockets are always scoped (Landlock ABI >= 6): only those made
  inside the jail can be reached, unless an `@name` is allowed.
- Signals and ptrace (Landlock ABI >= 6 for signals): the child cannot signal, ptrace or read
  /proc/PID/{mem,environ,root,cwd} of any process outside its own sandbox, jail included.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections import namedtuple

# Landlock filesystem rights (include/uapi/linux/landlock.h) and the ABI that brought each.
EXECUTE = 1 << 0
WRITE_FILE = 1 << 1
READ_FILE = 1 << 2
READ_DIR = 1 << 3
REMOVE_DIR = 1 << 4
REMOVE_FILE = 1 << 5
MAKE_CHAR = 1 << 6
MAKE_DIR = 1 << 7
MAKE_REG = 1 << 8
MAKE_SOCK = 1 << 9
MAKE_FIFO = 1 << 10
MAKE_BLOCK = 1 << 11
MAKE_SYM = 1 << 12
REFER = 1 << 13  # ABI 2
TRUNCATE = 1 << 14  # ABI 3
IOCTL_DEV = 1 << 15  # ABI 5
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1  # ABI 6

HANDLED_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1}
ALL_FS = (1 << 16) - 1
READ = EXECUTE | READ_FILE | READ_DIR
WRITE = (
    WRITE_FILE | REMOVE_DIR | REMOVE_FILE | MAKE_DIR | MAKE_REG | MAKE_SOCK | MAKE_FIFO | MAKE_SYM | REFER | TRUNCATE
)
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV
DEVICE_RIGHTS = READ_FILE | WRITE_FILE | TRUNCATE | IOCTL_DEV
HOME_FILE_RIGHTS = READ_FILE | WRITE_FILE | TRUNCATE
# Devices every program expects to open for writing; /dev/shm is not among them (shared with the host).
WRITABLE_DEVICES = (
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
    "/dev/tty",
    "/dev/ptmx",
    "/dev/pts",
)

SYS_LANDLOCK_CREATE_RULESET = 444  # the same number on every architecture
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1

SECRET_FILES = (".ssh", ".aws", ".config/gcloud", ".netrc", ".docker/config.json")
SHELL_RC_FILES = (".bashrc", ".bash_profile", ".profile", ".zshrc", ".zprofile")
GIT_PROTECTED = ("hooks", "config")
LAUNCHER_EXIT_STATUS = 125


try:  # in jail's process a JailError (one line on stderr); the launcher runs without the package
    from jail.model import JailError as _ErrorBase
except ImportError:
    _ErrorBase = Exception  # type: ignore[assignment,misc]


class ConfineError(_ErrorBase):
    """The restrictions cannot be applied; the message is one line for the user."""


POLICY_FIELDS = (
    "allow_write",
    "read_only",
    "deny_read",
    "protect",
    "allow_unix_sockets",
    "enabled",
    "tmp_dir",
    "home_files",
    "caches",
    "keep_caches",
    "cache_layer",
    "agent_channel",
)
# The launcher's arguments for the list fields, in POLICY_FIELDS order.
LIST_FLAGS = {
    "--write": "allow_write",
    "--deny": "deny_read",
    "--protect": "protect",
    "--socket": "allow_unix_sockets",
    "--home-file": "home_files",
    "--cache": "caches",
}


class FsPolicy(
    namedtuple("FsPolicy", POLICY_FIELDS, defaults=((), False, (), (), (), True, None, (), (), False, None, None))
):
    """What the jailed command may read and write. Paths are absolute; `tmp_dir` is filled in per run.

    A named tuple rather than a dataclass: the launcher imports this module on every start.
    """

    __slots__ = ()
    allow_write: tuple[str, ...]
    read_only: bool
    deny_read: tuple[str, ...]
    protect: tuple[str, ...]
    allow_unix_sockets: tuple[str, ...]
    enabled: bool
    tmp_dir: str | None
    # Files whose folder stays closed (e.g. ~/.claude.json in HOME) that the command may still create or
    # replace the way agents do (temp file + rename, a lock beside it): an agent profile's state files.
    home_files: tuple[str, ...]
    # Package-manager caches (~/.npm, ~/.cache/pip, ...) shown copy-on-write: reads see the user's cache,
    # writes land in a layer private to the run (written through to the real cache with keep_caches).
    caches: tuple[str, ...]
    keep_caches: bool
    # The run's private folder for the caches' upper layers (filled in per run; see caches.py).
    cache_layer: str | None
    # --ssh-agent: the inherited socket on which the launcher sends jail the seccomp listener that lets
    # jail answer the command's Unix stream sockets with its agent relay (filled in per run).
    agent_channel: int | None

    def to_args(self) -> list[str]:
        """The launcher's arguments for this policy (paths may hold any character but NUL)."""
        args: list[str] = []
        for flag, name in LIST_FLAGS.items():
            for path in getattr(self, name):
                args += [flag, path]
        args += ["--read-only"] if self.read_only else []
        args += ["--keep-caches"] if self.keep_caches else []
        args += [] if self.enabled else ["--disabled"]
        args += ["--tmp", self.tmp_dir] if self.tmp_dir else []
        args += ["--cache-layer", self.cache_layer] if self.cache_layer else []
        args += ["--agent-channel", str(self.agent_channel)] if self.agent_channel is not None else []
        return args

    @classmethod
    def from_args(cls, args: list[str]) -> tuple[FsPolicy, list[str]]:
        """The policy, and what follows its `--` (the command)."""
        lists: dict[str, list[str]] = {name: [] for name in LIST_FLAGS.values()}
        switches: set[str] = set()
        tmp_dir = cache_layer = agent_channel = None
        index = 0
        while index < len(args) and args[index] != "--":
            flag = args[index]
            if flag in LIST_FLAGS and index + 1 < len(args):
                lists[LIST_FLAGS[flag]].append(args[index + 1])
                index += 2
            elif flag == "--tmp" and index + 1 < len(args):
                tmp_dir = args[index + 1]
                index += 2
            elif flag == "--cache-layer" and index + 1 < len(args):
                cache_layer = args[index + 1]
                index += 2
            elif flag == "--agent-channel" and index + 1 < len(args) and args[index + 1].isdigit():
                agent_channel = int(args[index + 1])
                index += 2
            elif flag in ("--read-only", "--disabled", "--keep-caches"):
                switches.add(flag)
                index += 1
            else:
                raise ValueError(f"unknown launcher argument {flag!r}")
        policy = cls(
            allow_write=tuple(lists["allow_write"]),
            read_only="--read-only" in switches,
            deny_read=tuple(lists["deny_read"]),
            protect=tuple(lists["protect"]),
            allow_unix_sockets=tuple(lists["allow_unix_sockets"]),
            enabled="--disabled" not in switches,
            tmp_dir=tmp_dir,
            home_files=tuple(lists["home_files"]),
            caches=tuple(lists["caches"]),
            keep_caches="--keep-caches" in switches,
            cache_layer=cache_layer,
            agent_channel=agent_channel,
        )
        return policy, args[index + 1 :]

    @property
    def write_roots(self) -> tuple[str, ...]:
        tmp = (self.tmp_dir,) if self.tmp_dir else ()
        return tmp if self.read_only else (*self.allow_write, *tmp)

    def denying(self, paths) -> FsPolicy:
        """This policy with PATHS unreadable too."""
        return self._replace(deny_read=tuple(dict.fromkeys([*self.deny_read, *map(str, paths)])))


# ---------------------------------------------------------------------------------------------------
# Building the policy (in jail's own process)


def git_protected_paths(directory: str) -> list[str]:
    """`.git/hooks` and `.git/config` of DIRECTORY; for a `.git` pointer file also the file itself and
    the real git dir's (and its common dir's, for worktrees) hooks and config."""
    dot_git = os.path.join(directory, ".git")
    if not os.path.lexists(dot_git):
        # Not a repository: protecting paths that do not exist would forbid creating anything at the
        # top of the writable folder (Landlock cannot single out one missing name).
        return []
    paths = [os.path.join(dot_git, name) for name in GIT_PROTECTED]
    if os.path.isfile(dot_git):
        paths = [dot_git]
        try:
            with open(dot_git) as handle:
                first = handle.readline().strip()
        except OSError:
            return paths
        if first.startswith("gitdir:"):
            git_dir = os.path.join(directory, first[len("gitdir:") :].strip())
            dirs = [git_dir]
            try:
                with open(os.path.join(git_dir, "commondir")) as handle:
                    dirs.append(os.path.join(git_dir, handle.readline().strip()))
            except OSError:
                pass
            paths += [os.path.join(d, name) for d in dirs for name in GIT_PROTECTED]
    return [os.path.normpath(p) for p in paths]


def home_dirs() -> list[str]:
    """$HOME, and the home of the user who ran sudo (whom strong mode runs the command as)."""
    homes = [os.path.expanduser("~")]
    sudo_uid = os.environ.get("SUDO_UID")
    if sudo_uid and sudo_uid.isdigit() and sudo_uid != "0":
        import contextlib
        import pwd

        with contextlib.suppress(KeyError):
            homes.append(pwd.getpwuid(int(sudo_uid)).pw_dir)
    return list(dict.fromkeys(homes))


def build_policy(
    allow_write: tuple[str, ...] = (),
    read_only: bool = False,
    deny_read: tuple[str, ...] = (),
    protect: tuple[str, ...] = (),
    allow_unix_sockets: tuple[str, ...] = (),
    enabled: bool = True,
    also_write: tuple[str, ...] = (),
    home_files: tuple[str, ...] = (),
) -> FsPolicy:
    """The policy for these flags: `allow_write` replaces the current directory; the rest add to defaults.

    `also_write` (an agent's state folders) are writable besides them; `home_files` are single files the
    command may rewrite in a folder that stays closed. Paths of jail's own secrets (its CA's key) are
    added by the session once it knows them (`FsPolicy.denying`).
    """
    cwd = os.getcwd()
    writable = [os.path.abspath(p) for p in allow_write] or [cwd]
    writable += [os.path.abspath(p) for p in also_write]
    denied = [os.path.join(home, name) for home in home_dirs() for name in SECRET_FILES]
    denied += [os.path.abspath(p) for p in deny_read]
    protected = [os.path.join(home, name) for home in home_dirs() for name in SHELL_RC_FILES]
    for directory in dict.fromkeys([cwd, *writable]):
        protected += git_protected_paths(directory)
    protected += [os.path.abspath(p) for p in protect]
    sockets = tuple(p if p.startswith("@") else os.path.abspath(p) for p in allow_unix_sockets)
    return FsPolicy(
        allow_write=tuple(dict.fromkeys(writable)),
        read_only=read_only,
        deny_read=tuple(dict.fromkeys(denied)),
        protect=tuple(dict.fromkeys(protected)),
        allow_unix_sockets=sockets,
        enabled=enabled,
        home_files=tuple(dict.fromkeys(os.path.abspath(p) for p in home_files)),
    )


def launcher_prefix(policy: FsPolicy) -> list[str]:
    # -I: no current directory (a `jail` folder the agent wrote there must not be what runs) and no PYTHON*
    # variables; -S: no site-packages, the launcher needs only the standard library.
    here = os.path.dirname(os.path.abspath(__file__))
    boot = f"import sys; sys.path.insert(0, {here!r}); from confine import main; main()"
    return [sys.executable, "-I", "-S", "-c", boot, *policy.to_args(), "--"]


def confine_argv(policy: FsPolicy, argv: list[str]) -> list[str]:
    """The launcher in front of ARGV (for backends that run ARGV directly)."""
    if not policy.enabled:
        return list(argv)
    return [*launcher_prefix(policy), *argv]


def confine_command(policy: FsPolicy | None, backend, argv: list[str]) -> list[str]:
    """The backend's command line for ARGV, confined: a private temp dir is made (removed when jail exits).

    With `setpriv` (strong mode) the launcher goes right before it: it then runs as root with jail's
    interpreter, which the user the command runs as (SUDO_UID, --user) may not be able to execute, and
    it can make read-only bind mounts without a user namespace; setpriv then drops to that user.
    """
    if policy is None or not policy.enabled or backend.name not in ("weak", "strong", "rootless"):
        return backend.child_command(argv)
    require_landlock()
    wrapped = backend.child_command(argv)
    owner = _setpriv_owner(wrapped)
    policy = _with_private_tmp(policy, owner, backend.jail_id)
    if policy.caches and not policy.keep_caches:
        policy = policy._replace(cache_layer=_caches().make_layer(backend.jail_id))
    setprivs = [index for index, token in enumerate(wrapped) if os.path.basename(token) == "setpriv"]
    if backend.name == "strong" and setprivs:
        at = setprivs[0]
        return [*wrapped[:at], *launcher_prefix(policy), *wrapped[at:]]
    return backend.child_command(confine_argv(policy, argv))


def command_owner(backend) -> tuple[int, int] | None:
    """(uid, gid) the backend runs the command as when that is not jail's own user (strong mode's setpriv)."""
    return _setpriv_owner(backend.child_command(["true"]))


def create_missing(folders: list[str], files: dict[str, str], owner: tuple[int, int] | None) -> None:
    """Make the missing FOLDERS (mode 0700) and FILES (mode 0600, with their initial text) as OWNER, the
    user the command runs as, before the restrictions close the folders around them.

    Made by that user itself (not by root and chown'ed): a link the user planted on the way must not
    make root create anything elsewhere. A failure is said on one line and the command still runs.
    """
    folders = [f for f in folders if not os.path.lexists(f)]
    files = {path: text for path, text in files.items() if not os.path.lexists(path)}
    if not folders and not files:
        return
    import subprocess

    # Folders first (umask 077: 0700), then each file only if it still does not exist (noclobber: O_EXCL).
    script = (
        'umask 077; n=$1; shift; while [ "$n" -gt 0 ]; do mkdir -p -- "$1" || exit 1; shift; n=$((n-1)); done; '
        'set -C; while [ $# -gt 0 ]; do printf %s "$2" > "$1" || exit 1; shift 2; done'
    )
    args = [str(len(folders)), *folders, *[item for pair in files.items() for item in pair]]
    as_user = (
        {} if owner is None or owner[0] == os.geteuid() else {"user": owner[0], "group": owner[1], "extra_groups": []}
    )
    done = subprocess.run(
        ["/bin/sh", "-c", script, "sh", *args], capture_output=True, text=True, check=False, **as_user
    )
    if done.returncode != 0:
        import logging

        problem = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        logging.getLogger("jail").warning("cannot create the agent's state: %s", problem)


def _setpriv_owner(argv: list[str]) -> tuple[int, int] | None:
    found = {}
    for token in argv:
        for flag in ("--reuid=", "--regid="):
            if token.startswith(flag) and token[len(flag) :].isdigit():
                found[flag] = int(token[len(flag) :])
    return (found["--reuid="], found.get("--regid=", -1)) if "--reuid=" in found else None


def _with_private_tmp(policy: FsPolicy, owner: tuple[int, int] | None, jail_id: str) -> FsPolicy:
    import tempfile

    # Named from the jail id: the session removes every dir so named when it ends, and a later run
    # removes them when jail was killed.
    tmp = tempfile.mkdtemp(prefix=f"jail-{jail_id}-tmp-")
    if owner is not None:
        os.chown(tmp, owner[0], owner[1])
    return policy._replace(tmp_dir=tmp)


# ---------------------------------------------------------------------------------------------------
# Planning (pure but for listing directories)


def is_within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _listdir(path: str) -> list[tuple[str, bool]]:
    """(name, is a real directory or file, not a symlink) of each entry; [] when unreadable."""
    try:
        with os.scandir(path) as entries:
            return [(e.name, not e.is_symlink()) for e in entries]
    except OSError:
        return []


def plan_around(root: str, avoid: list[str], rights: int, listdir=_listdir) -> tuple[list[tuple[str, int]], list[str]]:
    """RIGHTS on ROOT's whole tree except the AVOID paths: (rules, directories on the way to an avoided path).

    Only directories on the way to an avoided path are descended into; every other entry gets one rule
    for its whole tree. Symlinks get no rule (what they point at is covered where it lives).
    """
    inner = [a for a in avoid if is_within(a, root)]
    if not inner:
        return [(root, rights)], []
    if root in inner:
        return [], []
    rules: list[tuple[str, int]] = []
    on_path = [root]
    for name, real in sorted(_entries(listdir, root)):
        if not real:
            continue
        child_rules, child_path = plan_around(os.path.join(root, name), inner, rights, listdir)
        rules += child_rules
        on_path += child_path
    return rules, on_path


def _entries(listdir, path: str) -> list[tuple[str, bool]]:
    return list(listdir(path))


def plan_rules(policy: FsPolicy, mounted: set[str], listdir=_listdir, exists=os.path.lexists) -> list[tuple[str, int]]:
    """Every Landlock rule for POLICY, given the protected paths already made read-only mounts."""
    denied = [os.path.realpath(p) for p in policy.deny_read]
    rules, on_path = plan_around("/", denied, READ, listdir)
    rules += [(d, READ_DIR) for d in on_path]
    roots = [os.path.realpath(r) for r in policy.write_roots if exists(r)]
    unmounted = [os.path.realpath(p) for p in policy.protect if os.path.realpath(p) not in mounted]
    avoid = denied + [p for p in unmounted if any(is_within(p, r) and p != r for r in roots)]
    for root in roots:
        write_rules, _ = plan_around(root, avoid, WRITE, listdir)
        rules += write_rules
    rules += [(d, DEVICE_RIGHTS) for d in WRITABLE_DEVICES if exists(d)]
    # A home file is rewritten in place: the agent's temp file + rename beside it is refused (EACCES),
    # and Claude Code then writes the file itself. Its folder stays closed.
    home_files = [os.path.realpath(f) for f in policy.home_files if not policy.read_only and exists(f)]
    rules += [(f, HOME_FILE_RIGHTS) for f in home_files if not any(is_within(f, d) for d in denied)]
    return rules


def plan_mounts(policy: FsPolicy, exists=os.path.lexists) -> list[tuple[str, bool]]:
    """(path, read-only) bind mounts, outermost first: each existing protected path inside a write root
    read-only, and every directory from that root down to it a (writable) mount point."""
    roots = [os.path.realpath(r) for r in policy.write_roots if exists(r)]
    mounts: dict[str, bool] = {}
    for raw in policy.protect:
        path = os.path.realpath(raw)
        containing = [r for r in roots if is_within(path, r) and path != r]
        if not containing or not exists(path):
            continue
        mounts[path] = True
        for root in containing:
            parent = os.path.dirname(path)
            # `/` as a write root: dirname("/") is "/" again, and a mount over the root is not needed (it
            # cannot be renamed or removed) nor seen by lookups that start from it.
            while is_within(parent, root) and parent != "/":
                mounts.setdefault(parent, False)
                parent = os.path.dirname(parent)
    return sorted(mounts.items(), key=lambda item: (item[0].count("/"), item[0]))


# ---------------------------------------------------------------------------------------------------
# Applying (in the launcher)

_libc = None


def libc():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    return _libc


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 when it has none (or it is disabled)."""
    if sys.platform != "linux":
        return 0
    version = libc().syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), LANDLOCK_CREATE_RULESET_VERSION)
    return max(int(version), 0)


def require_landlock() -> int:
    abi = landlock_abi()
    if abi < 1:
        raise ConfineError(
            "filesystem restrictions need Landlock, which this kernel lacks or has disabled"
            " (Linux 5.13+ with lsm=landlock); run with --no-fs-restrictions to go without"
        )
    return abi


class _RulesetAttr(ctypes.Structure):
    _fields_ = (
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    )


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = (("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32))


def _fail(what: str) -> ConfineError:
    return ConfineError(f"{what}: {os.strerror(ctypes.get_errno())}")


def apply_landlock(rules: list[tuple[str, int]], abi: int, scope_abstract: bool) -> None:
    handled = HANDLED_BY_ABI.get(abi, ALL_FS)
    scoped = (SCOPE_SIGNAL | (SCOPE_ABSTRACT_UNIX_SOCKET if scope_abstract else 0)) if abi >= 6 else 0
    attr = _RulesetAttr(handled, 0, scoped)
    size = ctypes.sizeof(attr) if abi >= 6 else 8
    ruleset = libc().syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), 0)
    if ruleset < 0:
        raise _fail("landlock_create_ruleset")
    try:
        for path, rights in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue  # gone since it was listed
            try:
                if not os.path.isdir(f"/proc/self/fd/{fd}"):
                    rights &= FILE_RIGHTS
                beneath = _PathBeneath(rights & handled, fd)
                if beneath.allowed_access and (
                    libc().syscall(SYS_LANDLOCK_ADD_RULE, ruleset, LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(beneath), 0)
                    < 0
                ):
                    raise _fail(f"landlock_add_rule {path}")
            finally:
                os.close(fd)
        if libc().syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0) < 0:
            raise _fail("landlock_restrict_self")
    finally:
        os.close(ruleset)


# seccomp: socket(AF_UNIX, ...) -> EACCES, a datagram socketpair(AF_UNIX, ...) -> EACCES,
# io_uring_setup -> ENOSYS, other architectures' calls -> killed.
# (arch, socket's number, connect's, seccomp's, socketpair's)
AUDIT_ARCH = {"x86_64": (0xC000003E, 41, 42, 317, 53), "aarch64": (0xC00000B7, 198, 203, 277, 199)}


def unix_socket_syscalls(machine: str) -> tuple[int, int]:
    """socket() and connect() on MACHINE: the calls the --ssh-agent filter sends to jail's supervisor."""
    _, nr_socket, nr_connect, _, _ = AUDIT_ARCH[machine]
    return nr_socket, nr_connect


NR_IO_URING_SETUP = 425
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
X32_SYSCALL_BIT = 0x40000000
AF_UNIX = 1
SOCK_STREAM = 1
SOCK_DGRAM = 2
# connect()'s address lengths that are never a Unix socket's: sockaddr_in and sockaddr_in6.
IP_ADDRESS_LENGTHS = (16, 28)
# BPF: load a word of seccomp_data, jump if equal / greater or equal, and, return.
LD, JEQ, JGE, AND, RET = 0x20, 0x15, 0x35, 0x54, 0x06
# seccomp_data offsets: nr, arch, and the low 32 bits of args[0], args[1], args[2].
NR, ARCH, ARG0, ARG1, ARG2 = 0, 4, 16, 24, 32


class _SockFilter(ctypes.Structure):
    _fields_ = (("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32))


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter)))


def assemble(lines: list[tuple]) -> list[tuple[int, int, int, int]]:
    """BPF with labels: a 1-tuple `(name,)` names the next instruction, and a jump's targets may be names
    (resolved to the relative offsets BPF wants), so no offset is counted by hand."""
    labels: dict[str, int] = {}
    code: list[tuple] = []
    for line in lines:
        if len(line) == 1:
            labels[line[0]] = len(code)
        else:
            code.append(line)

    def offset(pc: int, target: int | str) -> int:
        return labels[target] - pc - 1 if isinstance(target, str) else target

    return [(op, offset(pc, jt), offset(pc, jf), k) for pc, (op, jt, jf, k) in enumerate(code)]


def _preamble(arch: int) -> list[tuple]:
    """Other architectures' calls kill; x32 calls are refused; io_uring (which could open sockets past
    seccomp) is not there."""
    return [
        (LD, 0, 0, ARCH),
        (JEQ, 1, 0, arch),
        (RET, 0, 0, SECCOMP_RET_KILL_PROCESS),
        (LD, 0, 0, NR),
        (JGE, "refuse", 0, X32_SYSCALL_BIT),
        (JEQ, "absent", 0, NR_IO_URING_SETUP),
    ]


def _no_datagram_pairs() -> list[tuple]:
    """socketpair(AF_UNIX, ...): a stream or seqpacket pair reaches nothing but itself; a datagram one could
    be connected (or sendto'd) to any datagram socket of the host by path (/dev/log, systemd's notify
    socket)."""
    return [
        ("socketpair",),
        (LD, 0, 0, ARG0),
        (JEQ, 0, "allow", AF_UNIX),
        (LD, 0, 0, ARG1),
        (AND, 0, 0, 0xF),  # the type without SOCK_CLOEXEC and SOCK_NONBLOCK
        (JEQ, "refuse", "allow", SOCK_DGRAM),
    ]


def unix_socket_filter(machine: str) -> list[tuple[int, int, int, int]]:
    """The BPF program (code, jt, jf, k) that refuses socket(AF_UNIX, ...), datagram socketpairs and
    io_uring_setup."""
    if machine not in AUDIT_ARCH:
        raise ConfineError(f"no seccomp filter for {machine}; add --allow-unix-socket or --no-fs-restrictions")
    arch, nr_socket, _, _, nr_socketpair = AUDIT_ARCH[machine]
    import errno

    return assemble(
        [
            *_preamble(arch),
            (JEQ, "socket", 0, nr_socket),
            (JEQ, "socketpair", "allow", nr_socketpair),
            ("socket",),
            (LD, 0, 0, ARG0),
            (JEQ, "refuse", "allow", AF_UNIX),
            *_no_datagram_pairs(),
            ("allow",),
            (RET, 0, 0, SECCOMP_RET_ALLOW),
            ("refuse",),
            (RET, 0, 0, SECCOMP_RET_ERRNO | errno.EACCES),
            ("absent",),
            (RET, 0, 0, SECCOMP_RET_ERRNO | errno.ENOSYS),
        ]
    )


def agent_socket_filter(machine: str) -> list[tuple[int, int, int, int]]:
    """unix_socket_filter for --ssh-agent: socket(AF_UNIX, SOCK_STREAM) and connect() with an address
    length that is not an IP one go to jail's supervisor (SECCOMP_RET_USER_NOTIF), which hands out sockets
    already connected to its agent relay; any other AF_UNIX socket type is still refused.

    One filter, not a second one stacked on unix_socket_filter: the kernel applies the strictest answer
    of all filters, and EACCES would win over USER_NOTIF.
    """
    if machine not in AUDIT_ARCH:
        raise ConfineError(f"no seccomp filter for {machine}; --ssh-agent is not available on it")
    arch, nr_socket, nr_connect, _, nr_socketpair = AUDIT_ARCH[machine]
    import errno

    return assemble(
        [
            *_preamble(arch),
            (JEQ, "socket", 0, nr_socket),
            (JEQ, "connect", 0, nr_connect),
            (JEQ, "socketpair", "allow", nr_socketpair),
            ("socket",),
            (LD, 0, 0, ARG0),
            (JEQ, 0, "allow", AF_UNIX),
            (LD, 0, 0, ARG1),
            (AND, 0, 0, 0xF),
            (JEQ, "supervise", "refuse", SOCK_STREAM),
            ("connect",),
            (LD, 0, 0, ARG2),  # the address length
            (JEQ, "allow", 0, IP_ADDRESS_LENGTHS[0]),
            (JEQ, "allow", "supervise", IP_ADDRESS_LENGTHS[1]),
            *_no_datagram_pairs(),
            ("allow",),
            (RET, 0, 0, SECCOMP_RET_ALLOW),
            ("supervise",),
            (RET, 0, 0, SECCOMP_RET_USER_NOTIF),
            ("refuse",),
            (RET, 0, 0, SECCOMP_RET_ERRNO | errno.EACCES),
            ("absent",),
            (RET, 0, 0, SECCOMP_RET_ERRNO | errno.ENOSYS),
        ]
    )


def _fprog(program: list[tuple[int, int, int, int]]) -> _SockFprog:
    filters = (_SockFilter * len(program))(*[_SockFilter(*insn) for insn in program])
    return _SockFprog(len(program), filters)  # ctypes keeps FILTERS alive with it


def apply_seccomp(program: list[tuple[int, int, int, int]]) -> None:
    fprog = _fprog(program)
    if libc().prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        raise _fail("seccomp")


def apply_agent_seccomp(channel: int) -> None:
    """Install agent_socket_filter and send its listener to jail over CHANNEL (SCM_RIGHTS); both fds are
    closed before the command runs, so it holds neither."""
    import socket

    machine = os.uname().machine
    fprog = _fprog(agent_socket_filter(machine))
    nr_seccomp = AUDIT_ARCH[machine][3]
    listener = libc().syscall(
        nr_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER, ctypes.byref(fprog)
    )
    if listener < 0:
        raise _fail("seccomp listener")
    with socket.socket(fileno=channel) as jail:
        socket.send_fds(jail, [b"L"], [listener])
    os.close(listener)


CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_SLAVE = 1, 32, 4096, 16384, 1 << 19


def _mount(source: str | None, target: str, flags: int) -> None:
    encode = os.fsencode
    if libc().mount(encode(source) if source else None, encode(target), None, ctypes.c_ulong(flags), None) != 0:
        raise _fail(f"mount {target}")


def private_mount_namespace() -> bool:
    """A mount namespace of our own (in a user namespace when not root); False when the system refuses."""
    uid, gid = os.geteuid(), os.getegid()
    flags = CLONE_NEWNS if uid == 0 else CLONE_NEWNS | CLONE_NEWUSER
    if libc().unshare(flags) != 0:
        return False
    if uid != 0:
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as handle:
                handle.write(text)
    _mount(None, "/", MS_REC | MS_SLAVE)  # nothing of ours propagates back to the host
    return True


def _precreate_git_paths(policy: FsPolicy) -> None:
    """A missing `.git/hooks` or `.git/config` inside a write root is made empty, as `git init` would."""
    roots = [os.path.realpath(r) for r in policy.write_roots if os.path.exists(r)]
    for raw in policy.protect:
        path = os.path.realpath(raw)
        parent = os.path.dirname(path)
        if os.path.lexists(path) or not any(is_within(path, r) and path != r for r in roots):
            continue
        if not os.path.isfile(os.path.join(parent, "HEAD")) or os.path.basename(path) not in GIT_PROTECTED:
            continue
        try:
            if os.path.basename(path) == "hooks":
                os.mkdir(path, 0o755)
            else:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            owner = os.stat(parent)
            os.chown(path, owner.st_uid, owner.st_gid)
        except OSError:
            pass


def apply(policy: FsPolicy) -> None:
    """Confine this process (and what it exec's) to POLICY."""
    abi = require_landlock()
    if libc().prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS: required for Landlock and seccomp
        raise _fail("no_new_privs")
    mounted: set[str] = set()
    mounts = plan_mounts(policy) if policy.protect else []
    if mounts or policy.protect:
        _precreate_git_paths(policy)
        mounts = plan_mounts(policy)
    copy_on_write = bool(policy.caches) and not policy.keep_caches
    namespace = (bool(mounts) or copy_on_write) and private_mount_namespace()
    if mounts and namespace:
        for path, read_only in mounts:
            _mount(path, path, MS_BIND)
            if read_only:
                _mount(None, path, MS_REMOUNT | MS_BIND | MS_RDONLY)
                mounted.add(path)
        os.chdir(os.getcwd())  # the current directory may now be under a new mount point
    rules = plan_rules(policy, mounted)
    if policy.caches:
        caches = _caches().show_caches(policy.caches, policy.cache_layer, policy.keep_caches, namespace)
        denied = [os.path.realpath(p) for p in policy.deny_read]
        rules += [rule for cache in caches for rule in plan_around(cache, denied, WRITE)[0]]
    apply_landlock(rules, abi, not any(s.startswith("@") for s in policy.allow_unix_sockets))
    if policy.agent_channel is not None:
        apply_agent_seccomp(policy.agent_channel)
    elif not policy.allow_unix_sockets:
        apply_seccomp(unix_socket_filter(os.uname().machine))
    if policy.tmp_dir:
        for name in ("TMPDIR", "TMP", "TEMP"):
            os.environ[name] = policy.tmp_dir


def _caches():
    """The caches module: jail.platform.caches in jail's process, `caches` from this folder in the launcher."""
    if __package__:
        from jail.platform import caches
    else:
        import caches
    return caches


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    try:
        policy, command = FsPolicy.from_args(args)
    except ValueError as exc:
        command, problem = [], str(exc)
    else:
        problem = "" if command else "no command"
    if problem:
        print(f"confine: {problem}; usage: [--write DIR] [--deny PATH] ... -- COMMAND [ARGS...]", file=sys.stderr)
        sys.exit(2)
    try:
        if policy.enabled:
            apply(policy)
    except (ConfineError, OSError) as exc:
        print(f"jail: error: filesystem restrictions: {exc}", file=sys.stderr)
        sys.exit(LAUNCHER_EXIT_STATUS)
    try:
        os.execvp(command[0], command)
    except FileNotFoundError:
        print(f"jail: command not found: {command[0]}", file=sys.stderr)
        sys.exit(127)
    except PermissionError:
        print(f"jail: command not executable: {command[0]}", file=sys.stderr)
        sys.exit(126)


if __name__ == "__main__":
    main()
