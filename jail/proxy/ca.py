"""jail's certificate authority: made once per user, key readable by its owner only."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from jail.model import JailError

# mitmproxy finds the CA in its confdir under this base name.
CA_BASENAME = "mitmproxy"


def default_ca_dir() -> Path:
    if override := os.environ.get("JAIL_CA_DIR"):
        return Path(override).expanduser()
    config_home = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config_home) / "jail" / "ca"


def system_trust_store() -> Path:
    """The file of CAs this system trusts (Debian's bundle, else certifi's)."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile, "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    import certifi

    return Path(certifi.where())


def write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(handle, mode)
        os.write(handle, data)
    finally:
        os.close(handle)
    os.replace(temporary, path)


def concatenate_pem(*files: Path) -> bytes:
    return b"".join(f.read_bytes().rstrip(b"\n") + b"\n" for f in files)


@dataclass(frozen=True)
class CertificateAuthority:
    directory: Path

    @property
    def cert_path(self) -> Path:
        """The CA certificate alone: what a user adds to a trust store."""
        return self.directory / f"{CA_BASENAME}-ca-cert.pem"

    @property
    def key_path(self) -> Path:
        return self.directory / f"{CA_BASENAME}-ca.pem"

    @property
    def trust_dir(self) -> Path:
        """Certificates only (never the key): what SSL_CERT_DIR may name."""
        return self.directory / "trust"

    @property
    def bundle_path(self) -> Path:
        """System CAs plus jail's: for clients that replace their whole trust list with one file."""
        return self.trust_dir / "ca-bundle.pem"

    @classmethod
    def ensure(cls, directory: Path | None = None) -> CertificateAuthority:
        ca = cls((directory or default_ca_dir()).expanduser())
        try:
            if not ca.key_path.exists():
                ca._create()
            ca._refresh_bundle()
        except OSError as exc:
            raise JailError(
                f"cannot prepare jail's CA in {ca.directory}: {exc} (set JAIL_CA_DIR to a writable folder)"
            ) from None
        return ca

    def _create(self) -> None:
        from mitmproxy.certs import CertStore

        self.directory.parent.mkdir(parents=True, exist_ok=True)
        # Built beside the target and renamed into place, so two jails starting at once never
        # see half a CA; the loser of the race uses the winner's.
        staging = Path(tempfile.mkdtemp(dir=self.directory.parent, prefix=".ca-"))
        try:
            CertStore.create_store(staging, CA_BASENAME, 2048, organization="jail", cn="jail egress proxy CA")
            os.chmod(staging / f"{CA_BASENAME}-ca.pem", 0o600)
            os.chmod(staging, 0o700)
            try:
                os.rename(staging, self.directory)
            except OSError:
                if not self.key_path.exists():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _refresh_bundle(self) -> None:
        store = system_trust_store()
        bundle = self.bundle_path
        if bundle.exists() and bundle.stat().st_mtime >= max(store.stat().st_mtime, self.cert_path.stat().st_mtime):
            return
        self.trust_dir.mkdir(mode=0o755, exist_ok=True)
        write_atomically(self.trust_dir / "jail-ca.pem", self.cert_path.read_bytes())
        write_atomically(bundle, concatenate_pem(store, self.cert_path))
        # OpenSSL looks certificates up in a directory by subject-hash names.
        if openssl := shutil.which("openssl"):
            subprocess.run([openssl, "rehash", str(self.trust_dir)], capture_output=True, check=False)


def upstream_trust_bundle(extra_ca: Path, directory: Path) -> Path:
    """System CAs plus `--upstream-ca`: mitmproxy takes one file, and it replaces the default."""
    try:
        data = concatenate_pem(system_trust_store(), extra_ca)
    except OSError as exc:
        raise JailError(f"--upstream-ca: cannot read {extra_ca}: {exc.strerror}") from None
    if b"-----BEGIN CERTIFICATE-----" not in extra_ca.read_bytes():
        raise JailError(f"--upstream-ca: {extra_ca} holds no PEM certificate")
    path = directory / "upstream-trust.pem"
    write_atomically(path, data)
    return path
