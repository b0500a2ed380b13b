"""Docker backend: `jail --docker-run -- [docker run args] IMAGE CMD`.

Argument parsing is tested without a daemon. The rest runs against a private dockerd this module
starts (root, Debian's docker.io), with an image imported from a rootfs of busybox-static plus the
host's curl and its libraries: every bypass is tried from inside the container and must fail.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from jail.model import JailError, ProxyEndpoint
from jail.platform.docker import (
    DockerNames,
    container_environment,
    existing_jail_ids,
    parse_run_args,
    remove_jail,
)
from jail.proxy.dns import SYNTHETIC_NETWORK
from tests.conftest import (
    DENIED_NAME,
    TEST_NAME,
    UPSTREAM_HOST,
    Listener,
    Upstream,
    jail_argv,
    map_names,
    start_upstream,
    unmap_names,
    wait_for,
)
from tests.test_tcp_streams import BANNER, BannerServer, outside_address

IMAGE = "jail-test:latest"
CURL = ["curl", "-sS", "--connect-timeout", "3", "-m", "10", "-o", "/dev/null", "-w", "'%{http_code}\\n'"]


# ---------------------------------------------------------------------------------------------
# Argument parsing: no daemon needed


def test_common_docker_run_options_are_parsed():
    spec = parse_run_args(
        [
            *["--rm", "-it", "-e", "A=1", "--env=B", "-eC=3", "-v", "/data:/data:ro", "-w", "/work", "-u", "1000:1000"],
            *["--name", "agent", "--entrypoint", "/bin/sh", "--init", "-l", "k=v", "img:1", "-c", "echo hi", "--rm"],
        ]
    )
    assert spec.image == "img:1"
    assert spec.command == ["-c", "echo hi", "--rm"], "everything after the image is the command"
    assert spec.remove and spec.interactive and spec.tty and spec.init
    assert spec.env == ["A=1", "B", "C=3"]
    assert spec.volumes == ["/data:/data:ro"]
    assert (spec.workdir, spec.user, spec.name, spec.entrypoint) == ("/work", "1000:1000", "agent", "/bin/sh")
    assert spec.labels == {"k": "v"}


def test_short_option_clusters_and_separators():
    assert parse_run_args(["-ti", "img"]).tty
    spec = parse_run_args(["-i", "--rm=false", "--", "img", "true"])
    assert spec.interactive and not spec.remove and spec.image == "img" and spec.command == ["true"]
    assert parse_run_args(["-ie", "X=1", "img"]).env == ["X=1"]
    assert parse_run_args(["img"]).command == []


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--network", "host", "img"], "--network"),
        (["--net=host", "img"], "--net"),
        (["--privileged", "img"], "--privileged"),
        (["--cap-add", "NET_ADMIN", "img"], "NET_ADMIN"),
        (["--cap-add=sys_admin", "img"], "sys_admin"),
        (["--cap-add", "CAP_NET_ADMIN", "img"], "CAP_NET_ADMIN"),
        (["--cap-add", "ALL", "img"], "ALL"),
        (["--pid", "host", "img"], "--pid host"),
        (["--userns=host", "img"], "--userns host"),
        (["--device", "/dev/net/tun", "img"], "--device"),
        (["-v", "/var/run/docker.sock:/var/run/docker.sock", "img"], "docker.sock"),
        (["-v", "/run/docker.sock:/d.sock", "img"], "docker.sock"),
        (["-v", "/var/run:/host-run", "img"], "docker.sock"),
        (["-v", "/:/host", "img"], "docker.sock"),
        (["-d", "img"], "-d"),
        (["-p", "80:80", "img"], "-p"),
    ],
)
def test_options_that_defeat_the_jail_are_refused(args, says):
    with pytest.raises(JailError, match="not allowed") as refused:
        parse_run_args(args)
    assert says in str(refused.value) and "\n" not in str(refused.value)


def test_unknown_options_and_missing_values_are_named():
    with pytest.raises(JailError, match="unknown or unsupported docker run option --security-opt"):
        parse_run_args(["--security-opt", "seccomp=unconfined", "img"])
    with pytest.raises(JailError, match="-e needs a value"):
        parse_run_args(["-e"])
    with pytest.raises(JailError, match="no image"):
        parse_run_args(["--rm"])
    # A harmless capability is fine.
    assert parse_run_args(["--cap-add", "SYS_PTRACE", "img"]).cap_add == ["SYS_PTRACE"]


def test_container_environment_has_proxy_ca_paths_inside_and_secret_placeholders_only():
    spec = parse_run_args(["-e", "A=1", "-e", "FROM_JAIL", "-e", "TOKEN", "-e", "HTTP_PROXY=http://evil", "img"])
    proxy = ProxyEndpoint("10.234.0.1", 3128, Path("/home/u/.config/jail/ca/cert.pem"), Path("/x/trust/bundle.pem"))
    own = {"FROM_JAIL": "yes", "TOKEN": "real-secret", "UNRELATED": "no"}
    env = container_environment(spec, proxy, "0123abcd", {"TOKEN": "placeholder"}, own)
    assert env["A"] == "1" and env["FROM_JAIL"] == "yes" and "UNRELATED" not in env
    assert env["TOKEN"] == "placeholder", "a secret's real value never enters the container"
    assert env["HTTP_PROXY"] == env["https_proxy"] == "http://10.234.0.1:3128"
    assert env["SSL_CERT_FILE"] == "/etc/jail/ca-bundle.pem" and env["NODE_EXTRA_CA_CERTS"] == "/etc/jail/ca-cert.pem"
    assert env["JAIL_ID"] == "0123abcd"


# ---------------------------------------------------------------------------------------------
# A private Docker daemon and a test image


def _docker_missing() -> str | None:
    if os.geteuid() != 0:
        return "the Docker backend needs root"
    for tool in ("dockerd", "nft", "curl"):
        if shutil.which(tool) is None:
            return f"the {tool!r} command is missing"
    if shutil.which("busybox") is None:
        return "busybox is missing (apt-get install busybox-static)"
    return None


def _copy_with_libraries(binary: str, rootfs: Path, target: str) -> None:
    destination = rootfs / target.lstrip("/")
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(binary, destination)
    ldd = subprocess.run(["ldd", binary], capture_output=True, text=True, check=False).stdout
    for line in ldd.splitlines():
        library = next((part for part in line.split() if part.startswith("/")), None)
        if library:
            copy = rootfs / library.lstrip("/")
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.realpath(library), copy)


def _test_image_tar(workdir: Path) -> bytes:
    """busybox (every applet as a link) plus the host's curl and its libraries, as a tar."""
    rootfs = workdir / "rootfs"
    for folder in ("bin", "etc", "tmp"):
        (rootfs / folder).mkdir(parents=True, exist_ok=True)
    busybox = shutil.which("busybox")
    assert busybox is not None
    _copy_with_libraries(busybox, rootfs, "/bin/busybox")
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        if applet != "busybox" and "/" not in applet:
            (rootfs / "bin" / applet).symlink_to("busybox")
    _copy_with_libraries(shutil.which("curl") or "/usr/bin/curl", rootfs, "/bin/curl")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        archive.add(rootfs, arcname=".")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def dockerd() -> Iterator[str]:
    """A private dockerd (own data, exec root, socket); yields its DOCKER_HOST."""
    if (missing := _docker_missing()) is not None:
        pytest.skip(f"Docker tests need a daemon: {missing}")
    import docker

    # Short: containerd's socket path lives under the exec root and must fit a sun_path.
    workdir = Path(tempfile.mkdtemp(prefix="jdk-"))
    host = f"unix://{workdir}/docker.sock"
    log = open(workdir / "dockerd.log", "w")  # noqa: SIM115 - closed at the end of the session
    process = subprocess.Popen(
        [
            *["dockerd", "--data-root", f"{workdir}/data", "--exec-root", f"{workdir}/exec", "-H", host],
            *["--pidfile", f"{workdir}/dockerd.pid", "--iptables=false", "--ip6tables=false", "--bridge=none"],
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    clients = []
    try:

        def ready() -> bool:
            try:
                clients.append(docker.DockerClient(base_url=host, timeout=60))
                return True
            except docker.errors.DockerException:
                return False

        if not wait_for(ready, timeout=30, interval=0.1):
            pytest.skip(f"dockerd did not start: {(workdir / 'dockerd.log').read_text()[-2000:]}")
        client = clients[-1]
        client.api.import_image_from_data(_test_image_tar(workdir), repository="jail-test", tag="latest")
        yield host
        # A failed test may leave a jail behind: remove it while the daemon can still do so.
        for jail_id in existing_jail_ids(client):
            remove_jail(client, DockerNames(jail_id))
        client.close()
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        subprocess.run(["umount", "-R", f"{workdir}/exec"], capture_output=True, check=False)
        subprocess.run(["umount", "-R", f"{workdir}/data"], capture_output=True, check=False)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def docker_client(dockerd: str):
    import docker

    client = docker.DockerClient(base_url=dockerd, timeout=60)
    yield client
    client.close()


@pytest.fixture
def docker_env(jail_env: dict[str, str], dockerd: str) -> dict[str, str]:
    return {**jail_env, "DOCKER_HOST": dockerd}


@pytest.fixture
def docker_jail(run_jail, docker_env):
    """`jail RULE... --docker-run -- DOCKER_ARGS...`; pass the docker run args as `docker=[...]`."""

    def run(*flags: str, docker: list[str], **kwargs) -> subprocess.CompletedProcess:
        return run_jail(*flags, "--docker-run", "--", *docker, env=kwargs.pop("env", docker_env), **kwargs)

    return run


def in_container(script: str) -> list[str]:
    return ["--rm", IMAGE, "sh", "-c", script]


def leftovers(client, jail_id: str) -> list[str]:
    """What of this jail is still on the machine."""
    names = DockerNames(jail_id)
    found = [f"network {n.name}" for n in client.networks.list(names=[names.network]) if n.name == names.network]
    found += [f"container {c.name}" for c in client.containers.list(all=True, filters={"label": f"jail.id={jail_id}"})]
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=False).stdout
    found += [f"nft table {names.nft_table}" for line in tables.splitlines() if line.endswith(f" {names.nft_table}")]
    found += [f"link {names.host_link}" for name in psutil.net_if_addrs() if name == names.host_link]
    found += [f"file {path}" for path in (names.pid_file, names.spec_file) if path.exists()]
    return found


# ---------------------------------------------------------------------------------------------
# Requests from the container


def test_allowed_requests_pass_and_denied_get_403(docker_jail, http_upstream, https_upstream, tmp_path):
    audit = tmp_path / "audit.jsonl"
    script = "; ".join(
        [
            "ip -4 -o addr show eth0 | awk '{print $4}' | cut -d/ -f1",
            " ".join([*CURL, http_upstream.url("/allowed")]),
            " ".join([*CURL, https_upstream.url("/allowed")]),
            " ".join([*CURL, http_upstream.url("/denied")]),
            " ".join([*CURL, https_upstream.url("/denied")]),
            "ls /etc/jail",
        ]
    )
    result = docker_jail(
        "--js", "!r.path.startsWith('/denied')", "--audit-log", str(audit), docker=in_container(script)
    )
    assert result.returncode == 0, result.stderr
    address, *codes = result.stdout.split()
    assert codes[:4] == ["200", "200", "403", "403"], result.stdout + result.stderr
    assert sorted(codes[4:]) == ["ca-bundle.pem", "ca-cert.pem"], "the CA certificate and bundle, never the key"
    assert [r["path"] for r in http_upstream.requests + https_upstream.requests] == ["/allowed", "/allowed"]
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    requests = [r for r in records if r.get("kind") != "dns"]
    assert len(requests) == 4 and {r["requester_ip"] for r in requests} == {address}


def test_client_ignoring_proxy_variables_is_still_judged(docker_jail, named_upstreams, tmp_path):
    http, https = named_upstreams
    for upstream in named_upstreams:
        upstream.reset()
    audit = tmp_path / "audit.jsonl"
    noproxy = [*CURL, "--noproxy", "'*'"]
    script = "; ".join(
        [
            " ".join([*noproxy, f"http://{TEST_NAME}/direct"]),
            " ".join([*noproxy, f"https://{TEST_NAME}/direct"]),
            " ".join([*noproxy, f"http://{DENIED_NAME}/direct"]),
            " ".join([*noproxy, f"https://{DENIED_NAME}/direct"]),
            f"nslookup {TEST_NAME}",
        ]
    )
    result = docker_jail("--js", f"r.host === '{TEST_NAME}'", "--audit-log", str(audit), docker=in_container(script))
    lines = result.stdout.split("\n")
    assert lines[:4] == ["200", "200", "403", "403"], result.stdout + result.stderr
    assert [r["host"] for r in http.requests + https.requests] == [TEST_NAME, TEST_NAME]
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    answers = {r["answer"] for r in records if r.get("kind") == "dns" and r["name"] == TEST_NAME and r["answer"]}
    assert len(answers) == 1, "DNS goes to jail's resolver, which gives the name one address"
    (synthetic,) = answers
    assert ipaddress.ip_address(synthetic) in SYNTHETIC_NETWORK and synthetic in result.stdout


def _host_addresses(family: int = socket.AF_INET) -> list[str]:
    found = []
    for interface, addresses in psutil.net_if_addrs().items():
        if interface == "lo" or interface.startswith(("jb_", "vh_")):
            continue
        found += [a.address for a in addresses if a.family == family and not a.address.startswith("fe80")]
    return found


def test_direct_tcp_udp_and_outside_dns_fail(docker_jail):
    listener = Listener()
    addresses = _host_addresses()
    resolvers = []
    for address in addresses:
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((address, 53))
        udp.settimeout(0.1)
        resolvers.append(udp)
    try:
        probes = []
        for address in addresses:
            # Every TCP port of every address reaches jail, which judges it: the rule denies all, so only an
            # answer from the host itself (a 2xx, a byte) would be an escape.
            probes.append(f"curl -sf --noproxy '*' --connect-timeout 2 http://{address}:{listener.port}/ >/dev/null")
            probes.append(f"nc -w 2 {address} {listener.port} </dev/null | grep -q .")
            probes.append(f"timeout 4 nslookup outside.example {address}")
        # The gateway itself: only the proxy's ports and DNS; its other services are closed.
        probes.append(f"curl -s --noproxy '*' --connect-timeout 2 http://$GW:{listener.port}/ >/dev/null")
        for address in _host_addresses(socket.AF_INET6):
            probes.append(
                f"curl -s --noproxy '*' --connect-timeout 2 -g 'http://[{address}]:{listener.port}/' >/dev/null"
            )
        script = "GW=$(ip route | awk '/default/ {print $3}'); " + "; ".join(
            f"{probe} && echo 'PASSED: {probe}' || echo blocked" for probe in probes
        )
        result = docker_jail("--js", "false", docker=in_container(script), timeout=120)
        assert "PASSED" not in result.stdout, result.stdout
        assert result.stdout.split().count("blocked") == len(probes), result.stdout + result.stderr
        received = []
        for udp in resolvers:
            with contextlib.suppress(OSError):
                received.append(udp.recvfrom(512)[1])
        assert received == [], "no DNS query may reach another resolver"
        assert listener.seen == [], "nothing from the container may reach the host's other services"
    finally:
        listener.close()
        for udp in resolvers:
            udp.close()


OUTSIDE = ipaddress.ip_network("10.236.0.0/30")  # a "remote" network only the host's forwarding reaches
UDP_WATCHER = """
import socket, sys
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("0.0.0.0", 53))
while True:
    print(udp.recvfrom(512)[1][0], flush=True)
"""


@pytest.fixture
def forwarding_host() -> Iterator[tuple[str, subprocess.Popen]]:
    """The host as a Docker that manages iptables leaves it: forwarding on and a table accepting the
    bridges' traffic; a namespace behind a veth stands for the rest of the network, and
    a watcher there prints the source of every datagram that reaches its port 53. Yields its address and
    the watcher."""
    namespace = f"jdo{os.getpid() % 100000}"
    host_link, outside_link = f"{namespace}h", f"{namespace}o"
    host_side, outside = (str(address) for address in OUTSIDE.hosts())
    forwarding = Path("/proc/sys/net/ipv4/ip_forward")
    was = forwarding.read_text()
    mimic = f"""
table inet {namespace} {{
    chain forward {{ type filter hook forward priority 0; policy accept; iifname "jb_*" accept; }}
}}
"""
    steps = [
        ["ip", "netns", "add", namespace],
        ["ip", "link", "add", host_link, "type", "veth", "peer", "name", outside_link, "netns", namespace],
        ["ip", "addr", "add", f"{host_side}/30", "dev", host_link],
        ["ip", "link", "set", host_link, "up"],
        ["ip", "-n", namespace, "addr", "add", f"{outside}/30", "dev", outside_link],
        ["ip", "-n", namespace, "link", "set", outside_link, "up"],
        ["ip", "-n", namespace, "route", "add", "default", "via", host_side],
    ]
    watcher = None
    try:
        for step in steps:
            subprocess.run(step, check=True, capture_output=True)
        subprocess.run(["nft", "-f", "-"], input=mimic, text=True, check=True, capture_output=True)
        forwarding.write_text("1")
        watcher = subprocess.Popen(
            ["ip", "netns", "exec", namespace, sys.executable, "-c", UDP_WATCHER], stdout=subprocess.PIPE, text=True
        )
        yield outside, watcher
    finally:
        forwarding.write_text(was)
        if watcher is not None:
            watcher.kill()
            watcher.wait()
        subprocess.run(["nft", "delete", "table", "inet", namespace], capture_output=True, check=False)
        subprocess.run(["ip", "link", "delete", host_link], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "delete", namespace], capture_output=True, check=False)


def test_nothing_is_forwarded_even_where_docker_forwards_everything(docker_jail, docker_client, forwarding_host):
    """The jail's network is not Docker's `internal` kind, so Docker's own rules would let it out; the
    jail's table must stop UDP and ICMP to another network even then (TCP goes to jail, tested above)."""
    import docker

    outside, watcher = forwarding_host
    probe = f"timeout 3 nslookup leak.example {outside}; ping -c 1 -W 1 {outside} >/dev/null && echo PINGED"
    # The same probe from a container on an ordinary network reaches the watcher: the setup can see a leak.
    control_network = ipaddress.ip_network("10.235.7.0/29")
    plain = docker_client.networks.create(
        "jail-test-plain",
        driver="bridge",
        ipam=docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet=str(control_network))]),
        options={"com.docker.network.bridge.name": "jb_plain"},
    )
    try:
        control = docker_client.containers.run(IMAGE, ["sh", "-c", probe], network=plain.name, remove=True)
    finally:
        plain.remove()
    assert b"PINGED" in control, control
    result = docker_jail("--js", "true", docker=in_container(probe))
    assert "PINGED" not in result.stdout, result.stdout
    time.sleep(0.5)
    watcher.kill()
    sources = {ipaddress.ip_address(line) for line in watcher.stdout.read().split()}
    assert sources and all(source in control_network for source in sources), (
        "the control's queries reach the watcher, the jail's container's never"
    )


# ---------------------------------------------------------------------------------------------
# Every TCP connection judged by name, on any port, as in the strong mode

ECHO_NAME = "jail-docker-echo.test"
ECHO_ADDRESS = "127.0.0.6"  # ECHO_NAME's real address, let through with --allow-private
WEB_NAME = "jail-docker-web.test"  # the test upstreams' address, where web_8080 listens
NAME_LINES = [f"{ECHO_ADDRESS} {ECHO_NAME}", f"{UPSTREAM_HOST} {WEB_NAME}"]
UNKNOWN_SYNTHETIC = "198.18.255.200"
PATHS = ("allowed", "denied")


@pytest.fixture(scope="module")
def docker_names() -> Iterator[None]:
    """This module's names in the host's /etc/hosts, where jail looks them up after an allow."""
    map_names(NAME_LINES)
    yield
    unmap_names(NAME_LINES)


@pytest.fixture(scope="module")
def banner_server() -> Iterator[BannerServer]:
    server = BannerServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def web_upstreams(test_ca) -> Iterator[tuple[Upstream, Upstream]]:
    """HTTP on 8080 and HTTPS on 8443 of the test upstreams' address, the certificate for WEB_NAME."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    test_ca.issue_cert(WEB_NAME).configure_cert(context)
    started = []
    try:
        started += [start_upstream("http", None, port=8080), start_upstream("https", context, port=8443)]
    except OSError as exc:
        for upstream in started:
            upstream.stop()
        pytest.skip(f"port 8080 or 8443 of {UPSTREAM_HOST} is taken: {exc}")
    yield started[0], started[1]
    for upstream in started:
        upstream.stop()


def stream_records(audit: Path) -> list[dict]:
    return [r for r in map(json.loads, audit.read_text().splitlines()) if r.get("scheme") == "tcp"]


def nc_talks(*hosts: str, port: int) -> str:
    """busybox nc to each host in turn, the server speaking first; their outputs separated by `|`."""
    return "; echo '|'; ".join(f"(sleep 0.5; echo ping) | nc -w 3 {host} {port}" for host in hosts)


def test_streams_by_name_and_by_literal_are_judged_and_relayed(docker_jail, docker_names, banner_server, tmp_path):
    literal, port = outside_address(), banner_server.port
    before = len(banner_server.connections)
    audit, requests = tmp_path / "audit.jsonl", tmp_path / "requests.log"
    rule = f"r.scheme === 'tcp' && r.port === {port} && ['{ECHO_NAME}', '{literal}'].includes(r.host)"
    result = docker_jail(
        *["--js", rule, "--allow-private", f"{ECHO_ADDRESS}/32", "--allow-private", f"{literal}/32"],
        *["--audit-log", str(audit), "--request-log", str(requests)],
        docker=in_container(nc_talks(ECHO_NAME, literal, UNKNOWN_SYNTHETIC, port=port)),
    )
    by_name, by_literal, unknown = result.stdout.split("|\n")
    # The banner came before anything was sent: the server spoke first, through jail.
    assert by_name == by_literal == f"{BANNER.decode().strip()}\nPING\n", result.stdout + result.stderr
    assert unknown == "", "a synthetic address that stands for no name reaches nothing"
    assert len(banner_server.connections) == before + 2
    named, literal_record, refused = stream_records(audit)
    assert (named["url"], named["decision"], named["address"], named["bytes_up"]) == (
        f"tcp://{ECHO_NAME}:{port}",
        "allow",
        ECHO_ADDRESS,
        len("ping\n"),
    )
    assert named["bytes_down"] == len(BANNER) + len("PING\n") and named["end"] in ("client_closed", "server_closed")
    assert (literal_record["host"], literal_record["address"], literal_record["decision"]) == (
        literal,
        literal,
        "allow",
    )
    assert (refused["host"], refused["reason_code"], refused["end"]) == (
        UNKNOWN_SYNTHETIC,
        "unknown_synthetic",
        "denied",
    )
    lines = [line.split(" ", 1)[1] for line in requests.read_text().splitlines()]
    assert f"+ CONNECT tcp://{ECHO_NAME}:{port}" in lines and f"- CONNECT tcp://{UNKNOWN_SYNTHETIC}:{port}" in lines


def test_a_denied_stream_reaches_nothing_and_the_audit_log_says_why(docker_jail, docker_names, banner_server, tmp_path):
    literal, port = outside_address(), banner_server.port
    before = len(banner_server.connections)
    audit, requests = tmp_path / "audit.jsonl", tmp_path / "requests.log"
    result = docker_jail(
        *["--js", "r.scheme === 'tcp' ? 'no streams from this container' : true"],
        *["--allow-private", f"{ECHO_ADDRESS}/32", "--allow-private", f"{literal}/32"],
        *["--audit-log", str(audit), "--request-log", str(requests)],
        docker=in_container(nc_talks(ECHO_NAME, literal, port=port)),
    )
    assert result.stdout.split("|\n") == ["", ""], result.stdout + result.stderr
    time.sleep(0.3)
    assert len(banner_server.connections) == before, "the server sees no connection"
    assert [(r["url"], r["decision"], r["reason"], r["end"]) for r in stream_records(audit)] == [
        (f"tcp://{ECHO_NAME}:{port}", "deny", "no streams from this container", "denied"),
        (f"tcp://{literal}:{port}", "deny", "no streams from this container", "denied"),
    ]
    lines = [line.split(" ", 1)[1] for line in requests.read_text().splitlines()]
    assert lines == [f"- CONNECT tcp://{ECHO_NAME}:{port}", f"- CONNECT tcp://{literal}:{port}"]


def test_the_address_guard_refuses_loopback_behind_an_allowed_name(docker_jail, docker_names, banner_server, tmp_path):
    before = len(banner_server.connections)
    audit = tmp_path / "audit.jsonl"
    result = docker_jail(
        "--js", "true", "--audit-log", str(audit), docker=in_container(nc_talks(ECHO_NAME, port=banner_server.port))
    )
    assert result.stdout == "", result.stdout + result.stderr
    time.sleep(0.3)
    assert len(banner_server.connections) == before, "jail dialled nothing"
    (record,) = stream_records(audit)
    assert (record["decision"], record["reason_code"], record["end"], record["address"]) == (
        "allow",
        "loopback_address",
        "refused",
        ECHO_ADDRESS,
    )


def test_http_and_https_on_other_ports_are_judged_per_request(docker_jail, docker_names, web_upstreams, tmp_path):
    http, https = web_upstreams
    http.reset()
    https.reset()
    policy = tmp_path / "paths.toml"
    policy.write_text(f'[[rule]]\naction = "allow"\nhost = "{WEB_NAME}"\npath = "/allowed"\n')
    audit = tmp_path / "audit.jsonl"
    # Neither client uses the proxy variables (busybox wget -Y off, curl --noproxy): only the redirect
    # brings them to jail.
    calls = [f"wget -Y off -q -O /dev/null http://{WEB_NAME}:8080/{path} && echo 200 || echo refused" for path in PATHS]
    calls += [" ".join([*CURL, "--noproxy", "'*'", f"https://{WEB_NAME}:8443/{path}"]) for path in PATHS]
    result = docker_jail("--policy", str(policy), "--audit-log", str(audit), docker=in_container("; ".join(calls)))
    assert result.stdout.split() == ["200", "refused", "200", "403"], result.stdout + result.stderr
    assert "403" in result.stderr, "wget says why"
    assert [r["path"] for r in http.requests] == [r["path"] for r in https.requests] == ["/allowed"]
    judged = [(r["url"], r["decision"]) for r in map(json.loads, audit.read_text().splitlines()) if "decision" in r]
    assert judged == [
        (f"http://{WEB_NAME}:8080/allowed", "allow"),
        (f"http://{WEB_NAME}:8080/denied", "deny"),
        (f"https://{WEB_NAME}:8443/allowed", "allow"),
        (f"https://{WEB_NAME}:8443/denied", "deny"),
    ]


def test_explain_describes_the_tcp_path(run_jail):
    if os.geteuid() != 0:
        pytest.skip("--explain names the Docker mode only where it can run (root)")
    explained = run_jail("--explain", "--docker-run", "--", IMAGE, "true")
    mode = next(line for line in explained.stdout.splitlines() if line.startswith("mode: docker"))
    assert "CONNECT tcp://NAME:PORT" in mode and "synthetic address" in mode and "UDP is refused" in mode


# ---------------------------------------------------------------------------------------------
# Run options, exit codes, teardown


@pytest.mark.parametrize(
    "args",
    [
        ["--network", "host", IMAGE, "true"],
        ["-v", "/var/run/docker.sock:/var/run/docker.sock", IMAGE, "true"],
    ],
)
def test_refused_run_options_give_one_clear_line(docker_jail, docker_client, args):
    result = docker_jail("--js", "true", docker=args)
    assert result.returncode == 125
    assert result.stderr.strip().startswith("jail: error: --docker-run:") and "not allowed" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not any(n.name.startswith("jail-") for n in docker_client.networks.list())


@pytest.mark.parametrize("source", ["", "mitmproxy-ca.pem", "mitmproxy-ca.p12"])
def test_the_ca_key_cannot_be_mounted(docker_jail, ca_dir, source):
    result = docker_jail("--js", "true", docker=["-v", f"{ca_dir / source}:/ca", IMAGE, "true"])
    assert result.returncode == 125 and "CA key" in result.stderr


def test_the_ca_certificate_alone_can_be_mounted(docker_jail, ca_dir):
    result = docker_jail("--js", "true", docker=["-v", f"{ca_dir / 'trust'}:/ca:ro", IMAGE, "true"])
    assert result.returncode == 0, result.stderr


def test_exit_codes_propagate(docker_jail):
    assert docker_jail("--js", "true", docker=in_container("exit 9")).returncode == 9
    killed = docker_jail("--js", "true", docker=in_container("sleep 30 & kill -KILL $!; wait $!"))
    assert killed.returncode == 137
    missing = docker_jail("--js", "true", docker=["--rm", IMAGE, "no-such-command"])
    assert missing.returncode == 127, missing.stderr


def test_stdin_is_attached_with_i(docker_jail):
    result = docker_jail("--js", "true", docker=["--rm", "-i", IMAGE, "tr", "a-z", "A-Z"], input="hello\n")
    assert result.stdout == "HELLO\n"
    separate = docker_jail("--js", "true", docker=in_container("echo out; echo err >&2"))
    assert separate.stdout == "out\n" and "err\n" in separate.stderr


# The container's init (sh) ignores signals it has no trap for, as in any container.
WAITING = "trap 'exit 130' INT; trap 'exit 143' TERM; echo $JAIL_ID; while :; do sleep 0.2; done"


def start_docker_jail(docker_env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        jail_argv("--js", "true", "--docker-run", "--", *in_container(WAITING)),
        env=docker_env,
        stdout=subprocess.PIPE,
        text=True,
    )
    return process, process.stdout.readline().strip()


def test_nothing_is_left_after_a_normal_run_and_after_ctrl_c(docker_jail, docker_env, docker_client):
    finished = docker_jail("--js", "true", docker=in_container('echo "$JAIL_ID"'))
    jail_id = finished.stdout.strip()
    assert len(jail_id) == 8 and leftovers(docker_client, jail_id) == []
    process, jail_id = start_docker_jail(docker_env)
    assert "network jail-" + jail_id in leftovers(docker_client, jail_id)
    process.send_signal(signal.SIGINT)
    assert process.wait(30) == 130
    assert leftovers(docker_client, jail_id) == []
    process, jail_id = start_docker_jail(docker_env)
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 143
    assert leftovers(docker_client, jail_id) == []


def test_sigkilled_jail_is_cleaned_by_cleanup_without_touching_a_running_one(run_jail, docker_env, docker_client):
    survivor, survivor_id = start_docker_jail(docker_env)
    victim, victim_id = start_docker_jail(docker_env)
    try:
        victim.kill()
        victim.wait()
        # The attach program dies with jail and takes the --rm container with it.
        assert wait_for(lambda: not any(x.startswith("container") for x in leftovers(docker_client, victim_id)), 15)
        assert leftovers(docker_client, victim_id), "a SIGKILLed jail leaves its network until cleanup"
        cleanup = run_jail("--cleanup", env=docker_env)
        assert cleanup.returncode == 0
        assert leftovers(docker_client, victim_id) == [], (
            "jail --cleanup must reach the Docker backend (jail.platform.cleanup_orphans)"
        )
        assert victim_id in cleanup.stdout
        assert survivor.poll() is None and len(leftovers(docker_client, survivor_id)) >= 4
    finally:
        survivor.terminate()
        survivor.wait(30)
    assert wait_for(lambda: leftovers(docker_client, survivor_id) == [], timeout=10)
