"""jail's certificate authority: made once per user, key readable by its owner only; and the list of
CAs the host trusts, which both the proxy (upstream) and the child (jail's bundle) are given."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import shutil
import ssl
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from jail.model import JailError

logger = logging.getLogger("jail.ca")

# mitmproxy finds the CA in its confdir under this base name.
CA_BASENAME = "mitmproxy"
# Bundles the host's programs trust, named in jail's own environment: trusted upstream too.
TRUST_VARIABLES = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "CURL_CA_BUNDLE")
PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]+?-----END CERTIFICATE-----")
# The bundle's first line says which sources it was made from; after it, the host's CAs, then jail's.
BUNDLE_HEADER = b"# jail trust bundle, sources "
JAIL_CA_MARKER = b"# jail's own CA\n"


def default_ca_dir() -> Path:
    if override := os.environ.get("JAIL_CA_DIR"):
        return Path(override).expanduser()
    config_home = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config_home) / "jail" / "ca"


def system_trust_store() -> Path:
    """The file of CAs this system trusts (OpenSSL's default, Debian's bundle, else certifi's). Not
    $SSL_CERT_FILE: that one is a source of its own, and may hold only a corporate CA."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.openssl_cafile, paths.cafile, "/etc/ssl/certs/ca-certificates.crt"):
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


def pem_certificates(data: bytes) -> list[bytes]:
    """Every PEM certificate in `data`, with its line ends made LF (so that copies compare equal)."""
    return [block.replace(b"\r\n", b"\n") for block in PEM_CERTIFICATE.findall(data)]


def checked_upstream_ca(path: Path) -> Path:
    """`--upstream-ca` must be a readable file holding a PEM certificate: a mistake there is the user's to fix."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise JailError(f"--upstream-ca: cannot read {path}: {exc.strerror}") from None
    if not pem_certificates(data):
        raise JailError(f"--upstream-ca: {path} holds no PEM certificate")
    return path


@dataclass(frozen=True)
class TrustSources:
    """The files whose CAs jail trusts: the system store, the bundles named in jail's own environment,
    `--upstream-ca`. An environment file that is missing or unreadable is skipped (it is the host's
    setting, not the user's request); what its certificates are is read only when the fingerprint of
    the files (path, size, mtime) changed since the bundle was last made."""

    files: tuple[Path, ...]
    fingerprint: str

    @classmethod
    def gather(cls, upstream_ca: Path | None = None, environ: Mapping[str, str] | None = None) -> TrustSources:
        environ = os.environ if environ is None else environ
        candidates = [system_trust_store()]
        candidates += [Path(environ[name]).expanduser() for name in TRUST_VARIABLES if environ.get(name)]
        if upstream_ca is not None:
            candidates.append(checked_upstream_ca(upstream_ca))
        stamps: dict[Path, str] = {}
        for candidate in candidates:
            try:
                path = candidate.resolve()
                status = path.stat()
            except (OSError, RuntimeError) as exc:
                logger.info("trust: skipping %s: %s", candidate, getattr(exc, "strerror", None) or exc)
                continue
            if path not in stamps and path.is_file():
                stamps[path] = f"{path}\0{status.st_size}\0{status.st_mtime_ns}"
        digest = hashlib.sha256("\n".join(stamps.values()).encode()).hexdigest()
        return cls(tuple(stamps), digest)

    def certificates(self) -> list[bytes]:
        """Every certificate of every source, once, in the order the sources were named."""
        unique: dict[bytes, None] = {}
        for path in self.files:
            try:
                data = path.read_bytes()
            except OSError as exc:
                logger.info("trust: skipping %s: %s", path, exc.strerror)
                continue
            found = pem_certificates(data)
            if not found:
                logger.info("trust: %s holds no PEM certificate", path)
            unique.update(dict.fromkeys(found))
        return list(unique)


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


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
        """Certificates only (never the key): what SSL_CERT_DIR may name, and all a child needs."""
        return self.directory / "trust"

    @property
    def trust_cert_path(self) -> Path:
        """The CA certificate's copy inside `trust_dir` (NODE_EXTRA_CA_CERTS)."""
        return self.trust_dir / "jail-ca.pem"

    @property
    def bundle_path(self) -> Path:
        """The CAs the host trusts plus jail's: for clients that replace their whole trust list with one file."""
        return self.trust_dir / "ca-bundle.pem"

    def private_files(self) -> list[Path]:
        """Every file in the CA folder that holds, or could hold, a private key: all of it but `trust/`
        and the public certificate files (mitmproxy writes the key as PEM and PKCS#12 today, and may
        add forms tomorrow)."""
        try:
            entries = list(self.directory.iterdir())
        except OSError:
            return []
        public = f"{CA_BASENAME}-ca-cert."
        return sorted(p for p in entries if p != self.trust_dir and not p.name.startswith(public))

    @classmethod
    def ensure(cls, directory: Path | None = None, trust: TrustSources | None = None) -> CertificateAuthority:
        ca = cls((directory or default_ca_dir()).expanduser())
        try:
            if not ca.key_path.exists():
                ca._create()
            ca._refresh_bundle(trust or TrustSources.gather())
        except OSError as exc:
            raise JailError(
                f"cannot prepare jail's CA in {ca.directory}: {exc} (set JAIL_CA_DIR to a writable folder)"
            ) from None
        return ca

    def _create(self) -> None:
        from mitmproxy.certs import CertStore

        # Made inside the folder (which may already exist, in a parent the user cannot write) and moved
        # into place key last, under a lock: two jails starting at once never see half a CA.
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with exclusive_lock(self.directory / ".lock"):
            if self.key_path.exists():
                return  # another jail made it meanwhile
            staging = Path(tempfile.mkdtemp(dir=self.directory, prefix=".staging-"))
            try:
                CertStore.create_store(staging, CA_BASENAME, 2048, organization="jail", cn="jail egress proxy CA")
                os.chmod(staging / self.key_path.name, 0o600)
                for made in sorted(staging.iterdir(), key=lambda path: path.name == self.key_path.name):
                    os.replace(made, self.directory / made.name)
            finally:
                shutil.rmtree(staging, ignore_errors=True)

    def _bundle_header(self, trust: TrustSources) -> bytes:
        own = self.cert_path.stat()
        stamp = f"{trust.fingerprint}\0{own.st_size}\0{own.st_mtime_ns}".encode()
        return BUNDLE_HEADER + hashlib.sha256(stamp).hexdigest().encode() + b"\n"

    def _refresh_bundle(self, trust: TrustSources) -> None:
        """Remake the bundle only when a source (or jail's certificate) changed: a start-up reads one line."""
        header = self._bundle_header(trust)
        try:
            with self.bundle_path.open("rb") as current:
                if current.readline() == header:
                    return
        except OSError:
            pass
        self.trust_dir.mkdir(mode=0o755, exist_ok=True)
        own = self.cert_path.read_bytes()
        write_atomically(self.trust_cert_path, own)
        write_atomically(self.bundle_path, header + b"\n".join(trust.certificates()) + b"\n" + JAIL_CA_MARKER + own)
        # OpenSSL looks certificates up in a directory by subject-hash names.
        if openssl := shutil.which("openssl"):
            subprocess.run([openssl, "rehash", str(self.trust_dir)], capture_output=True, check=False)

    def write_upstream_trust(self, trust: TrustSources, directory: Path) -> Path:
        """The proxy's list of CAs for upstream servers, written into this run's `directory`: the bundle
        without jail's own CA (mitmproxy reads the file later, so it is this run's own copy)."""
        data = self.bundle_path.read_bytes()
        header, _, rest = data.partition(b"\n")
        if header + b"\n" == self._bundle_header(trust):
            hosts = rest.partition(JAIL_CA_MARKER)[0]
        else:  # another jail, started with other sources, remade the bundle meanwhile
            hosts = b"\n".join(trust.certificates()) + b"\n"
        path = directory / "upstream-trust.pem"
        write_atomically(path, hosts)
        return path
