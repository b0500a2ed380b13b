"""Named clients of `jail --server`: a client names itself with proxy authentication
(`http://agent-7:TOKEN@host:port`, i.e. `Proxy-Authorization: Basic base64(agent-7:TOKEN)`).

The tokens file (`--clients FILE`) holds one `NAME TOKEN` per line; blank lines and lines starting with
`#` are skipped. A name is letters, digits, `.`, `_` and `-` (it cannot hold the `:` that Basic
credentials split on); a token is any run of printable characters without spaces. Tokens are compared in
constant time, and a name that is not in the file costs the same comparison as one that is.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
from dataclasses import dataclass, field
from pathlib import Path

from jail.model import JailError

CLIENT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
TOKEN = re.compile(r"[!-~]+")  # printable ASCII, no space
# Compared against when the name is unknown, so that the time taken does not tell names apart.
UNKNOWN_NAME_TOKEN = b"\x00" * 32


class ClientAuthError(ValueError):
    """Credentials that name no client: the client gets 407 and the reason is audited."""


@dataclass(frozen=True)
class ClientTokens:
    """The names and tokens of `--clients FILE`, and whether a client must give one (`--require-client`)."""

    tokens: dict[str, bytes] = field(default_factory=dict)
    required: bool = False

    @classmethod
    def load(cls, path: Path, required: bool = False) -> ClientTokens:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise JailError(f"--clients: cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
        tokens: dict[str, bytes] = {}
        for number, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            where = f"{path}:{number}"
            if len(parts) != 2:
                raise JailError(f"{where}: expected `NAME TOKEN` (two words), found {len(parts)}")
            name, token = parts
            if not CLIENT_NAME.fullmatch(name):
                raise JailError(f"{where}: client name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
            if not TOKEN.fullmatch(token):
                raise JailError(f"{where}: the token of {name} must be printable ASCII without spaces")
            if name in tokens:
                raise JailError(f"{where}: client {name} is named twice")
            tokens[name] = token.encode()
        if not tokens:
            raise JailError(f"--clients: {path} names no client (one `NAME TOKEN` per line)")
        return cls(tokens, required)

    def identify(self, authorization: str | None) -> str:
        """The client's name from a Proxy-Authorization value; "" when none was given (allowed unless
        required). Raises ClientAuthError for credentials that are wrong or missing when required."""
        if not authorization:
            if self.required:
                raise ClientAuthError("this proxy requires a client name and token (proxy authentication)")
            return ""
        scheme, _, encoded = authorization.strip().partition(" ")
        if scheme.lower() != "basic":
            raise ClientAuthError(f"proxy authentication must be Basic, not {scheme[:20]!r}")
        try:
            name, colon, token = base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise ClientAuthError("proxy authentication is not valid Basic credentials") from None
        expected = self.tokens.get(name)
        matches = hmac.compare_digest(token.encode(), expected if expected is not None else UNKNOWN_NAME_TOKEN)
        if not colon or expected is None or not matches:
            # The name only when it is a known one: an unknown "name" may be a token typed in the wrong field.
            who = f"client {name}" if expected is not None else "an unknown client"
            raise ClientAuthError(f"wrong token for {who} (--clients)")
        return name
