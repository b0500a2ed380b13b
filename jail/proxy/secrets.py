"""Secrets the child never sees: it holds a placeholder, and the proxy swaps in the real value
only in HTTPS requests to the hosts the secret is for (header values, Basic credentials, the
query). A placeholder headed anywhere else is a leak and is denied; a real value echoed back by
a listed host reaches the child as the placeholder again.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ctypes
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from jail.model import JailError

# Keep a vendor prefix (`sk-`, `ghp_`) so clients that check a key's shape accept the placeholder.
VENDOR_PREFIX = re.compile(r"^[A-Za-z]{1,8}[-_]")


@dataclass(frozen=True)
class Secret:
    name: str
    value: str
    hosts: frozenset[str]
    placeholder: str

    @classmethod
    def create(cls, name: str, value: str, hosts: Iterable[str]) -> Secret:
        if not value:
            raise JailError(f"--secret {name}: the value is empty")
        prefix = match.group(0) if (match := VENDOR_PREFIX.match(value)) else ""
        placeholder = f"{prefix}jail{secrets.token_hex(16)}"
        return cls(name, value, frozenset(h.strip().lower().rstrip(".") for h in hosts if h.strip()), placeholder)


def parse_secret_spec(spec: str, environ: dict[str, str], files: dict[str, str]) -> Secret:
    """`NAME=HOST[,HOST...]`; the value comes from `files[NAME]` (a path) or jail's own environment."""
    name, sep, hosts = spec.partition("=")
    if not sep or not name or not hosts:
        raise JailError(f"--secret {spec!r}: expected NAME=HOST[,HOST...]")
    if name in files:
        try:
            value = open(files[name]).read().strip()  # noqa: SIM115 - read once, closed at once
        except OSError as exc:
            raise JailError(f"--secret-file {name}: cannot read {files[name]}: {exc.strerror}") from None
    elif name in environ:
        value = environ[name]
    else:
        raise JailError(f"--secret {name}: set {name} in jail's environment or give --secret-file {name}=PATH")
    return Secret.create(name, value, hosts.split(","))


PR_SET_DUMPABLE = 4
# /proc/PID/stat fields 50 and 51 (1-based): where the kernel's copy of the initial environment lies.
ENV_START_FIELD, ENV_END_FIELD = 50, 51


def hide_from_children(items: Iterable[Secret]) -> None:
    """Leave the real values nowhere a jailed child can read them in jail's own process.

    os.environ loses them (so nothing jail starts inherits them), and the initial environment block,
    which the kernel serves as /proc/PID/environ for the whole life of the process whatever
    os.environ says, is overwritten in place. The process is made non-dumpable, so a child of the
    same uid cannot read its memory (/proc/PID/mem) either."""
    values = [item.value.encode() for item in items]
    if not values:
        return
    for item in items:
        if os.environ.get(item.name) == item.value:
            del os.environ[item.name]
    with contextlib.suppress(OSError, ValueError, IndexError):
        _overwrite_initial_environment(values)
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


def _overwrite_initial_environment(values: list[bytes]) -> None:
    with open("/proc/self/stat", "rb") as handle:
        stat = handle.read()
    fields = stat[stat.rindex(b")") + 2 :].split()  # fields from the third on (the name may hold spaces)
    start, end = int(fields[ENV_START_FIELD - 3]), int(fields[ENV_END_FIELD - 3])
    with open("/proc/self/mem", "r+b", buffering=0) as memory:
        memory.seek(start)
        block = memory.read(end - start)
        scrubbed = block
        for value in values:
            scrubbed = scrubbed.replace(value, b"*" * len(value))
        if scrubbed != block:
            memory.seek(start)
            memory.write(scrubbed)


class Vault:
    def __init__(self, items: Iterable[Secret] = ()) -> None:
        self.items = tuple(items)

    def __bool__(self) -> bool:
        return bool(self.items)

    def carried(self, texts: Iterable[str]) -> list[Secret]:
        """The secrets whose placeholder appears in any of these texts (Basic credentials decoded)."""
        if not self.items:
            return []
        found = []
        expanded = [*texts]
        expanded += [decoded for text in expanded if (decoded := _basic_credentials(text)) is not None]
        for secret in self.items:
            if any(secret.placeholder in text for text in expanded):
                found.append(secret)
        return found

    def leaks(self, carried: list[Secret], host: str, scheme: str) -> list[Secret]:
        """Secrets that would leave for a host they are not for, or in clear text."""
        return [s for s in carried if host not in s.hosts or scheme != "https"]

    def inject(self, text: str, secrets_for_host: list[Secret]) -> str:
        for secret in secrets_for_host:
            text = text.replace(secret.placeholder, secret.value)
        if (decoded := _basic_credentials(text)) is not None and any(
            s.placeholder in decoded for s in secrets_for_host
        ):
            for secret in secrets_for_host:
                decoded = decoded.replace(secret.placeholder, secret.value)
            text = text.split(" ", 1)[0] + " " + base64.b64encode(decoded.encode()).decode()
        return text

    def masker(self, host: str) -> ResponseMasker | None:
        listed = [s for s in self.items if host in s.hosts]
        return ResponseMasker(listed) if listed else None


def _basic_credentials(text: str) -> str | None:
    scheme, _, token = text.partition(" ")
    if scheme.lower() != "basic" or not token:
        return None
    try:
        return base64.b64decode(token.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None


class ResponseMasker:
    """Replaces real values with placeholders in a response body, also across chunk boundaries."""

    def __init__(self, items: list[Secret]) -> None:
        self.pairs = [(s.value.encode(), s.placeholder.encode()) for s in items]
        self.keep = max(len(value) for value, _ in self.pairs) - 1
        self.tail = b""

    def mask(self, data: bytes) -> bytes:
        for value, placeholder in self.pairs:
            data = data.replace(value, placeholder)
        return data

    def __call__(self, chunk: bytes) -> bytes:
        """A mitmproxy stream callable; the empty chunk at the end flushes what was held back."""
        data = self.mask(self.tail + chunk)
        if not chunk:
            self.tail = b""
            return data
        # Hold back what could be the start of a value split across chunks.
        cut = max(0, len(data) - self.keep)
        self.tail = data[cut:]
        return data[:cut]
