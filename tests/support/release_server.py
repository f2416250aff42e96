"""A local release server and fabricated WasmEdge release archives.

GitHub releases are unreachable from these machines, so the tests serve fabricated
archives from a real HTTP server on 127.0.0.1 instead. Everything else is real:
urllib downloads over TCP, Range requests and 206 answers, validators (a strong ETag
and Last-Modified, as GitHub's release CDN sends) and If-Range, dropped connections,
redirects, tarfile extraction, symlinks, bash sourcing the env file. The archives
mimic the layouts of the pinned releases (WasmEdge 0.14.1: ``WasmEdge-<v>-Linux/{bin,
lib}``; the WASI-NN plugin archive: ``libwasmedgePluginWasiNN.so`` at its root), with
the stand-in ``wasmedge`` script (a test double at the process boundary) as the binary.
A release also gets its ``SHA256SUM`` (``<hex>  <name>`` lines, as WasmEdge attaches).

With ``tls`` (tests/support/tls.py) the server speaks HTTPS with a certificate of a
throwaway CA; clients trust it only through ``$EDGEBUNDLE_EXTRA_CA_FILE``.
"""

from __future__ import annotations

import hashlib
import io
import re
import socket
import ssl
import tarfile
import threading
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from edgebundle.host import detect
from tests.support.standin_wasmedge import fake_plugin, write_standin
from tests.support.tls import TestCA

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    range: str | None
    status: int
    if_range: str | None = None


@dataclass
class ReleaseServer:
    """Serves files below ``root`` on a free 127.0.0.1 port, with Range support."""

    root: Path
    requests: list[Request] = field(default_factory=list)
    ignore_ranges: bool = False  # answer 200 with the whole file even to a Range request
    etag: bool = True  # send a strong ETag (the sha256 of the file)
    last_modified: bool = True  # send Last-Modified (the file's mtime)
    ignore_if_range: bool = False  # answer a Range with 206 even when If-Range does not match
    tls: TestCA | None = None  # serve HTTPS with this CA's server certificate
    _drops: dict[str, int] = field(default_factory=dict)
    _redirects: dict[str, str] = field(default_factory=dict)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> ReleaseServer:
        handler = _make_handler(self)
        if self.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.tls.server_cert, self.tls.server_key)
            server: ThreadingHTTPServer = _TLSServer(("127.0.0.1", 0), handler, context)
        else:
            server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server = server
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return int(self._server.server_address[1])

    def url(self, relpath: str) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}/{relpath}"

    def redirect(self, relpath: str, to: str) -> None:
        """Every GET of ``relpath`` answers 302 with ``Location: to`` (as GitHub does)."""
        with self._lock:
            self._redirects["/" + relpath] = to

    def drop_after(self, relpath: str, nbytes: int) -> None:
        """The next GET of ``relpath`` sends ``nbytes`` of its body, then drops the connection."""
        with self._lock:
            self._drops["/" + relpath] = nbytes

    def gets(self, relpath: str | None = None) -> list[Request]:
        with self._lock:
            return [
                r
                for r in self.requests
                if r.method == "GET" and (relpath is None or r.path == "/" + relpath)
            ]

    def _take_drop(self, path: str) -> int | None:
        with self._lock:
            return self._drops.pop(path, None)

    def _redirect_for(self, path: str) -> str | None:
        with self._lock:
            return self._redirects.get(path)

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)


class _TLSServer(ThreadingHTTPServer):
    """HTTPS: the TLS handshake runs in each request's own thread, not the accept loop."""

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        context: ssl.SSLContext,
    ) -> None:
        super().__init__(address, handler)
        self.context = context

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return  # a client that does not trust our CA hangs up during the handshake
        self.RequestHandlerClass(tls, client_address, self)


def _make_handler(server: ReleaseServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # quiet test output
            pass

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = self.path.split("?", 1)[0]
            file = (server.root / path.lstrip("/")).resolve()
            wanted = self.headers.get("Range")
            target = server._redirect_for(path)
            if target is not None:
                server._record(Request("GET", path, wanted, 302))
                self.send_response(302)
                self.send_header("Location", target)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if not file.is_file() or server.root.resolve() not in file.parents:
                server._record(Request("GET", path, wanted, 404))
                self.send_error(404)
                return
            data = file.read_bytes()
            etag = f'"{hashlib.sha256(data).hexdigest()}"'
            modified = formatdate(file.stat().st_mtime, usegmt=True)
            validators = {"ETag": etag if server.etag else None,
                          "Last-Modified": modified if server.last_modified else None}
            if_range = self.headers.get("If-Range")
            start, status = 0, 200
            match = _RANGE.match(wanted or "")
            # RFC 9110 13.1.5: a Range whose If-Range does not match the current file is
            # ignored, and the whole file is sent.
            current = if_range is None or if_range in validators.values()
            if match and not server.ignore_ranges and (current or server.ignore_if_range):
                start = int(match.group(1))
                if start >= len(data):
                    server._record(Request("GET", path, wanted, 416))
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
            body = data[start:]
            server._record(Request("GET", path, wanted, status, if_range))
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            for name, value in validators.items():
                if value is not None:
                    self.send_header(name, value)
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            drop = server._take_drop(path)
            if drop is not None:
                self.wfile.write(body[:drop])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            self.wfile.write(body)

    return Handler


def closed_port_url(relpath: str = "x.tar.gz") -> str:
    """A URL on 127.0.0.1 where nothing listens (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/{relpath}"


# ---------------------------------------------------------------- fabricated releases


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_sha256sum(root: Path, listed: Mapping[str, str]) -> Path:
    """``root/SHA256SUM`` in sha256sum's format: ``<hex>  <name>`` per line."""
    path = root / "SHA256SUM"
    path.write_text("".join(f"{sha}  {name}\n" for name, sha in listed.items()), "utf-8")
    return path


def make_runtime_archive(directory: Path, version: str, *, top_dir: bool = True) -> Path:
    """A WasmEdge release tarball: ``WasmEdge-<v>-Linux/{bin/wasmedge, lib/libwasmedge.so*}``."""
    staging = directory / f"staging-runtime-{version}"
    write_standin(staging / "bin" / "wasmedge", version=version, plugin_version=f"{version}.0")
    lib = staging / "lib"
    lib.mkdir(parents=True, exist_ok=True)
    (lib / "libwasmedge.so.0").write_bytes(b"\x7fELF fake libwasmedge " + version.encode())
    (lib / "libwasmedge.so").symlink_to("libwasmedge.so.0")
    archive = directory / f"WasmEdge-{version}-ubuntu20.04_x86_64.tar.gz"
    prefix = f"WasmEdge-{version}-Linux" if top_dir else "."
    with tarfile.open(archive, "w:gz") as tar:
        for item in sorted(staging.rglob("*")):
            tar.add(
                item, arcname=f"{prefix}/{item.relative_to(staging).as_posix()}", recursive=False
            )
    return archive


def make_plugin_archive(
    directory: Path, version: str, variant: str = "cpu", *, in_dir: bool = False
) -> Path:
    """A WASI-NN GGML plugin tarball: ``libwasmedgePluginWasiNN.so`` at its root (or in a dir)."""
    suffix = "" if variant == "cpu" else f"-{variant}"
    plugin = fake_plugin(
        directory / f"staging-plugin-{version}{suffix}" / "libwasmedgePluginWasiNN.so"
    )
    archive = (
        directory / f"WasmEdge-plugin-wasi_nn-ggml{suffix}-{version}-ubuntu20.04_x86_64.tar.gz"
    )
    name = "plugin/libwasmedgePluginWasiNN.so" if in_dir else "libwasmedgePluginWasiNN.so"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(plugin, arcname=name)
    return archive


def make_evil_archive(directory: Path, name: str = "evil.tar.gz") -> Path:
    """A tarball whose entry climbs out of the extraction directory."""
    archive = directory / name
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        payload = b"outside"
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    return archive


@dataclass(frozen=True)
class Release:
    """One fabricated WasmEdge release served by a ReleaseServer, and its lock file."""

    version: str
    runtime: Path
    plugin: Path
    lock: Path
    pins: Path


def publish_release(
    server: ReleaseServer,
    workdir: Path,
    version: str = "0.14.1",
    *,
    known_sha: bool = True,
    runtime_sha: str | None = None,
    variants: tuple[str, ...] = ("cpu", "noavx"),
    app_bytes: bytes = b"\0asm\x01\0\0\0 fake llama-chat",
    platform: tuple[str, str] | None = None,
    verify: Collection[str] = (),
) -> Release:
    """Build archives for ``version`` under the server root and write a lock + pins for them.

    The assets are pinned for ``platform`` (default: this machine's os/arch), so the CLI's
    own host detection finds them. ``verify`` names the components ("wasmedge", "plugin")
    whose rows say ``verify = "release-sha256sum"`` instead of a sha256 (the server must
    then speak https). The release's SHA256SUM lists every archive, as WasmEdge's does.
    """
    this = detect()
    os_name, arch = platform or (this.os, this.arch)
    root = server.root
    root.mkdir(parents=True, exist_ok=True)
    runtime = make_runtime_archive(root, version)
    plugins = {v: make_plugin_archive(root, version, v) for v in variants}
    app = root / f"llama-chat-{version}.wasm"
    app.write_bytes(app_bytes)
    model = root / "tiny.gguf"
    model.write_bytes(b"GGUF" + b"\0" * 60)

    def pin(path: Path) -> str:
        return sha256(path) if known_sha else "unknown"

    # Every archive under the root, so releases published side by side all stay listed.
    write_sha256sum(root, {p.name: sha256(p) for p in sorted(root.glob("*.tar.gz"))})
    rows = [
        _asset(
            os_name,
            arch,
            "wasmedge",
            None,
            server.url(runtime.name),
            None if "wasmedge" in verify else runtime_sha or pin(runtime),
            f"WasmEdge-{version}-Linux",
        ),
        *(
            _asset(
                os_name,
                arch,
                "plugin",
                v,
                server.url(p.name),
                None if "plugin" in verify else pin(p),
                None,
            )
            for v, p in plugins.items()
        ),
    ]
    lock = workdir / f"lock-{version}.toml"
    lock.write_text(
        "schema = 1\n"
        f'[wasmedge]\nversion = "{version}"\nsource = "fabricated for tests"\n'
        f'[plugin]\nname = "wasi_nn"\nlibrary = "libwasmedgePluginWasiNN.so"\n'
        f'version = "{version}"\nbuild = "b0001"\n' + "".join(rows),
        encoding="utf-8",
    )
    pins = workdir / f"pins-{version}.toml"
    pins.write_text(
        "schema = 1\n"
        f'[[app]]\nname = "llama-chat"\nversion = "{version}"\nkind = "llama-chat"\n'
        f'url = "{server.url(app.name)}"\nsha256 = "{pin(app)}"\nsource = "fabricated"\n'
        f'[[model]]\nname = "tiny"\nurl = "{server.url(model.name)}"\nsha256 = "{pin(model)}"\n'
        'template = "llama-3-chat"\n',
        encoding="utf-8",
    )
    return Release(version, runtime, plugins[variants[0]], lock, pins)


def _asset(
    os_name: str,
    arch: str,
    component: str,
    variant: str | None,
    url: str,
    sha: str | None,
    root: str | None,
) -> str:
    """One [[asset]] row; ``sha`` None: verified against the release's SHA256SUM."""
    text = f'[[asset]]\ncomponent = "{component}"\nos = "{os_name}"\narch = "{arch}"\n'
    if variant:
        text += f'variant = "{variant}"\n'
    check = 'verify = "release-sha256sum"' if sha is None else f'sha256 = "{sha}"'
    text += f'url = "{url}"\n{check}\nsource = "fabricated for tests"\n'
    if root:
        text += f'archive_root = "{root}"\n'
    return text


def repin(lock: Path, root: Path) -> None:
    """Rewrite the lock's sha256s to match the files now under ``root`` (after swapping one)."""
    from edgebundle.pins import load_runtime_lock

    text = lock.read_text(encoding="utf-8")
    for asset in load_runtime_lock(lock).assets:
        if asset.verified:
            text = text.replace(asset.sha256, sha256(root / asset.filename))
    lock.write_text(text, encoding="utf-8")
