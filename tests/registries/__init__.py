"""Local package registries for the caches tests: one HTTPS server (a test CA's certificate for a name the
test maps to 127.0.0.2) serving an npm package, a Python wheel in a simple index and a Go module through
the GOPROXY protocol, each built here. It records every path asked for, so a test can tell a download
from a cache hit."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import ssl
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import trustme

REGISTRY_NAME = "jail-registry.test"
REGISTRY_ADDRESS = "127.0.0.2"
NPM_PACKAGE = ("tinypkg", "1.0.0")
WHEEL = ("tinywheel", "1.0")
GO_MODULE = ("example.test/tiny", "v1.0.0")
GENUINE = "genuine"


class Registry:
    """Files by path; `requests` lists every path asked for, in order."""

    def __init__(self, ca: trustme.CA) -> None:
        self.files: dict[str, tuple[bytes, str]] = {}
        self.requests: list[str] = []
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert(REGISTRY_NAME).configure_cert(context)
        registry = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                registry.requests.append(path)
                body, content_type = registry.files.get(path, (b"not found\n", ""))
                self.send_response(200 if content_type else 404)
                self.send_header("content-type", content_type or "text/plain")
                self.send_header("content-length", str(len(body)))
                self.send_header("cache-control", "max-age=3600")
                self.end_headers()
                self.wfile.write(body)

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def get_request(self):  # type: ignore[no-untyped-def]
                sock, address = super().get_request()
                return context.wrap_socket(sock, server_side=True), address

        self.server = Server((REGISTRY_ADDRESS, 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.files.update(npm_package(self.url("/"), *NPM_PACKAGE))
        self.files.update(python_wheel(*WHEEL))
        self.files.update(go_module("/go", *GO_MODULE))

    def url(self, path: str) -> str:
        return f"https://{REGISTRY_NAME}:{self.server.server_address[1]}{path}"

    def downloads(self) -> list[str]:
        """The package files (not the indexes) asked for since the last `clear`."""
        return [p for p in self.requests if p.endswith((".tgz", ".whl", ".zip"))]

    def clear(self) -> None:
        self.requests.clear()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def npm_package(base_url: str, name: str, version: str) -> dict[str, tuple[bytes, str]]:
    """The packument and the tarball of a one-file package."""
    files = {
        "package/package.json": json.dumps({"name": name, "version": version, "main": "index.js"}).encode(),
        "package/index.js": f"module.exports = {GENUINE!r};\n".encode(),
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(data), 0o644
            archive.addfile(info, io.BytesIO(data))
    tarball = buffer.getvalue()
    tarball_path = f"/{name}/-/{name}-{version}.tgz"
    dist = {
        "tarball": base_url.rstrip("/") + tarball_path,
        "shasum": hashlib.sha1(tarball).hexdigest(),
        "integrity": "sha512-" + base64.b64encode(hashlib.sha512(tarball).digest()).decode(),
    }
    packument = {
        "name": name,
        "dist-tags": {"latest": version},
        "versions": {version: {"name": name, "version": version, "dist": dist}},
    }
    return {
        f"/{name}": (json.dumps(packument).encode(), "application/json"),
        tarball_path: (tarball, "application/octet-stream"),
    }


def python_wheel(name: str, version: str) -> dict[str, tuple[bytes, str]]:
    """A pure-Python wheel and its page in a PEP 503 simple index (/simple/NAME/)."""
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"VALUE = {GENUINE!r}\n".encode(),
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: jail-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(
        f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}\n"
        for path, data in files.items()
    )
    files[f"{info}/RECORD"] = (record + f"{info}/RECORD,,\n").encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    wheel = buffer.getvalue()
    filename = f"{name}-{version}-py3-none-any.whl"
    page = f'<a href="/files/{filename}#sha256={hashlib.sha256(wheel).hexdigest()}">{filename}</a>\n'
    return {f"/simple/{name}/": (page.encode(), "text/html"), f"/files/{filename}": (wheel, "application/octet-stream")}


def go_module(prefix: str, module: str, version: str) -> dict[str, tuple[bytes, str]]:
    """A one-file module served by the GOPROXY protocol under PREFIX."""
    go_mod = f"module {module}\n\ngo 1.19\n".encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(f"{module}@{version}/go.mod", go_mod)
        archive.writestr(f"{module}@{version}/tiny.go", f'package tiny\n\nconst Value = "{GENUINE}"\n')
    base = f"{prefix}/{module}/@v"
    return {
        f"{base}/list": (f"{version}\n".encode(), "text/plain"),
        f"{base}/{version}.info": (
            json.dumps({"Version": version, "Time": "2024-01-01T00:00:00Z"}).encode(),
            "application/json",
        ),
        f"{base}/{version}.mod": (go_mod, "text/plain"),
        f"{base}/{version}.zip": (buffer.getvalue(), "application/zip"),
    }
