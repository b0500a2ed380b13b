"""Trust like the host: upstream servers are verified against the system store plus the CA bundles named
in jail's own environment (and --upstream-ca); what fails upstream is a one-line 502 the agent can read,
with an `upstream_*` reason code in the audit log. Also the CA folder's defects: where the CA is made, and
which of its files hold a private key."""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from jail.model import JailError
from jail.proxy.ca import CertificateAuthority, TrustSources, system_trust_store
from tests.conftest import PYTHON, UPSTREAM_HOST, Upstream, free_port, jail_argv, start_upstream


@pytest.fixture(scope="module")
def private_ca() -> trustme.CA:
    """A CA that only a bundle named in jail's environment holds (never --upstream-ca)."""
    return trustme.CA()


@pytest.fixture(scope="module")
def private_upstream(private_ca: trustme.CA) -> Iterator[Upstream]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    private_ca.issue_cert(UPSTREAM_HOST).configure_cert(context)
    upstream = start_upstream("https", context)
    yield upstream
    upstream.stop()


@pytest.fixture(autouse=True)
def _fresh_private_upstream(request: pytest.FixtureRequest) -> None:
    if "private_upstream" in request.fixturenames:
        request.getfixturevalue("private_upstream").reset()


@pytest.fixture(scope="module")
def private_bundle(private_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A host bundle as a corporate machine has one: the system CAs plus the inspection CA."""
    path = tmp_path_factory.mktemp("host-trust") / "corporate-bundle.pem"
    path.write_bytes(system_trust_store().read_bytes() + private_ca.cert_pem.bytes())
    return path


def curl_in_jail(weak_jail, url: str, *args: str, env: dict[str, str], audit: Path) -> tuple[int, str]:
    result = weak_jail(
        "--audit-log",
        str(audit),
        "--js",
        "true",
        "--",
        "curl",
        "-sS",
        "-w",
        "\n%{http_code}",
        *args,
        url,
        upstream_ca=False,
        env=env,
    )
    body, _, status = result.stdout.rpartition("\n")
    return int(status or 0), body


def audit_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("variable", ["SSL_CERT_FILE", "NODE_EXTRA_CA_CERTS"])
def test_a_ca_in_jails_environment_is_trusted_upstream(
    weak_jail, jail_env, private_upstream, private_bundle, private_ca, tmp_path, variable
) -> None:
    extra = private_bundle if variable == "SSL_CERT_FILE" else tmp_path / "extra.pem"
    if variable == "NODE_EXTRA_CA_CERTS":
        private_ca.cert_pem.write_to_path(str(extra))  # Node's variable holds the extra CAs alone
    env = {**jail_env, variable: str(extra)}
    status, body = curl_in_jail(weak_jail, private_upstream.url("/trusted"), env=env, audit=tmp_path / "a.jsonl")
    assert status == 200, body
    assert [r["path"] for r in private_upstream.requests] == ["/trusted"]


@pytest.mark.parametrize("http_version", ["--http1.1", "--http2"])
def test_an_unknown_ca_gets_a_502_that_names_the_certificate(
    weak_jail, jail_env, private_upstream, tmp_path, http_version
) -> None:
    audit = tmp_path / "audit.jsonl"
    status, body = curl_in_jail(weak_jail, private_upstream.url("/x"), http_version, env=jail_env, audit=audit)
    assert status == 502
    first, reason = body.splitlines()
    assert first == f"jail: upstream failed for GET {private_upstream.url('/x')}"
    assert reason.startswith(f"reason: TLS verification of {UPSTREAM_HOST}:{private_upstream.port} failed: ")
    assert "issuer" in reason and "Testing CA" in reason  # trustme's CA, named
    assert "--upstream-ca" in reason and "SSL_CERT_FILE" in reason
    [record] = audit_records(audit)
    assert (record["decision"], record["reason_code"], record["status"]) == ("allow", "upstream_tls", 502)
    assert private_upstream.requests == []


def test_a_name_that_does_not_resolve_gets_a_502_at_once(weak_jail, jail_env, tmp_path) -> None:
    audit = tmp_path / "audit.jsonl"
    started = time.monotonic()
    status, body = curl_in_jail(weak_jail, "https://no-such-host.invalid/", env=jail_env, audit=audit)
    assert time.monotonic() - started < 15
    assert status == 502
    assert body.splitlines() == [
        "jail: upstream failed for GET https://no-such-host.invalid/",
        body.splitlines()[1],
    ]
    assert body.splitlines()[1].startswith("reason: cannot resolve no-such-host.invalid")
    assert [r["reason_code"] for r in audit_records(audit)] == ["upstream_dns"]


URLLIB_CLIENT = """
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=20)
except urllib.error.HTTPError as error:
    print(error.code, error.headers["content-type"], error.read().decode(), sep="\\n", end="")
"""


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_refused_connection_gets_a_502_a_python_client_can_read(weak_jail, jail_env, tmp_path, scheme) -> None:
    audit = tmp_path / "audit.jsonl"
    url = f"{scheme}://{UPSTREAM_HOST}:{free_port()}/closed"  # nothing listens there
    result = weak_jail("--audit-log", str(audit), "--js", "true", "--", PYTHON, "-c", URLLIB_CLIENT, url, env=jail_env)
    status, content_type, *lines = result.stdout.splitlines()
    assert (status, content_type) == ("502", "text/plain; charset=utf-8"), result.stdout + result.stderr
    assert lines == [
        f"jail: upstream failed for GET {url}",
        f"reason: cannot connect to {UPSTREAM_HOST}:{url.split(':')[2].split('/')[0]}: connection refused",
    ]
    assert [r["reason_code"] for r in audit_records(audit)] == ["upstream_refused"]


# The trust list itself.


def test_trust_sources_skip_what_is_missing_or_not_pem(tmp_path: Path, private_ca: trustme.CA) -> None:
    good = tmp_path / "good.pem"
    private_ca.cert_pem.write_to_path(str(good))
    copy = tmp_path / "copy.pem"
    copy.write_bytes(good.read_bytes().replace(b"\n", b"\r\n"))  # the same CA, CRLF
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    environ = {
        "SSL_CERT_FILE": str(good),
        "REQUESTS_CA_BUNDLE": str(tmp_path / "missing.pem"),
        "NODE_EXTRA_CA_CERTS": str(junk),
        "CURL_CA_BUNDLE": str(tmp_path / "dangling"),
    }
    trust = TrustSources.gather(copy, environ)
    assert trust.files == (system_trust_store().resolve(), good, junk, copy)
    certificates = trust.certificates()
    assert certificates.count(private_ca.cert_pem.bytes().strip()) == 1  # once, though named twice
    system = trust.certificates()[:-1]
    assert len(system) == len(set(system)) > 10
    # A directory named as a bundle is skipped as well.
    assert TrustSources.gather(None, {"SSL_CERT_FILE": str(tmp_path)}).files == (system_trust_store().resolve(),)


def test_a_bad_upstream_ca_is_still_an_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("no certificate here\n")
    with pytest.raises(JailError, match="holds no PEM certificate"):
        TrustSources.gather(junk, {})


def test_the_bundle_is_remade_only_when_a_source_changes(tmp_path: Path, private_ca: trustme.CA) -> None:
    ca = CertificateAuthority.ensure(tmp_path / "ca", TrustSources.gather(None, {}))
    made = ca.bundle_path.stat().st_mtime_ns
    assert private_ca.cert_pem.bytes().strip() not in ca.bundle_path.read_bytes()

    CertificateAuthority.ensure(ca.directory, TrustSources.gather(None, {}))
    assert ca.bundle_path.stat().st_mtime_ns == made

    extra = tmp_path / "extra.pem"
    private_ca.cert_pem.write_to_path(str(extra))
    trust = TrustSources.gather(None, {"NODE_EXTRA_CA_CERTS": str(extra)})
    CertificateAuthority.ensure(ca.directory, trust)
    bundle = ca.bundle_path.read_bytes()
    assert private_ca.cert_pem.bytes().strip() in bundle
    assert bundle.rstrip().endswith(ca.cert_path.read_bytes().strip())  # jail's CA too, for the child

    upstream = ca.write_upstream_trust(trust, tmp_path)
    assert upstream.parent == tmp_path
    assert private_ca.cert_pem.bytes().strip() in upstream.read_bytes()
    assert ca.cert_path.read_bytes().strip() not in upstream.read_bytes()  # the proxy never trusts itself


# The CA folder.


def test_private_files_are_every_file_that_may_hold_the_key(tmp_path: Path) -> None:
    ca = CertificateAuthority.ensure(tmp_path / "ca", TrustSources.gather(None, {}))
    (ca.directory / "mitmproxy-ca.der").write_bytes(b"a form of the key mitmproxy may add one day")
    private = ca.private_files()
    for entry in ca.directory.iterdir():
        data = entry.read_bytes() if entry.is_file() else b""
        holds_key = b"PRIVATE KEY" in data or entry.name in ("mitmproxy-ca.p12", "mitmproxy-ca.der")
        if holds_key:
            assert entry in private, entry.name
    assert ca.key_path in private and ca.directory / "mitmproxy-ca.p12" in private
    assert ca.trust_dir not in private
    assert not [path for path in private if path.name.startswith("mitmproxy-ca-cert.")]
    assert b"PRIVATE KEY" not in b"".join(p.read_bytes() for p in ca.trust_dir.iterdir() if p.is_file())


def test_an_existing_ca_dir_in_a_folder_the_user_cannot_write_is_enough(jail_env, tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("chattr") is None:
        pytest.skip("an immutable parent folder needs root and chattr")
    parent = tmp_path / "locked"
    ca_dir = parent / "ca"
    ca_dir.mkdir(parents=True)
    if subprocess.run(["chattr", "+i", str(parent)], capture_output=True).returncode != 0:
        pytest.skip("this filesystem has no immutable flag")
    try:
        result = subprocess.run(
            jail_argv("--weak", "--js", "true", "--", "true"),
            env={**jail_env, "JAIL_CA_DIR": str(ca_dir)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert sorted(p.name for p in parent.iterdir()) == ["ca"]
        assert CertificateAuthority(ca_dir).key_path.stat().st_mode & 0o077 == 0
    finally:
        subprocess.run(["chattr", "-i", str(parent)], check=True)


def test_node_extra_ca_certs_is_the_copy_in_trust(weak_jail, jail_env, ca_dir: Path) -> None:
    result = weak_jail("--js", "true", "--", "env", env=jail_env)
    child = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    path = Path(child["NODE_EXTRA_CA_CERTS"])
    assert path == ca_dir / "trust" / "jail-ca.pem"
    assert path.read_bytes() == CertificateAuthority(ca_dir).cert_path.read_bytes()
