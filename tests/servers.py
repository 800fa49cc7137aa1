"""Real servers on loopback for the storage tests: nginx serving a directory, moto's S3 server, and a fault proxy.

The clients under test (fsspec's HTTP filesystem, s3fs) talk to these over TCP exactly as to a remote store; nothing
in the client is mocked. nginx comes from Debian (tests/servers_setup.sh installs it); where it is missing the
tests that need it skip, unless SSLTRAIN_REQUIRE_SERVERS is set.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def require_nginx() -> str:
    if NGINX is None:
        if os.environ.get("SSLTRAIN_REQUIRE_SERVERS"):
            pytest.fail("nginx is missing and SSLTRAIN_REQUIRE_SERVERS is set: run tests/servers_setup.sh")
        pytest.skip("nginx is missing: run tests/servers_setup.sh (installs Debian's nginx)")
    return NGINX


@contextlib.contextmanager
def nginx(root: Path, workdir: Path) -> Iterator[str]:
    """nginx serving ``root`` on a free loopback port (range requests are on by default for static files);
    yields its base URL. One process (master_process off), so it runs as the current user with its files."""
    binary = require_nginx()
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = {name: workdir / name for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    for d in tmp.values():
        d.mkdir(exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(
        f"""daemon off;
master_process off;
pid {workdir}/nginx.pid;
error_log stderr error;
events {{ worker_connections 256; }}
http {{
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    client_body_temp_path {tmp["body"]};
    proxy_temp_path {tmp["proxy"]};
    fastcgi_temp_path {tmp["fastcgi"]};
    uwsgi_temp_path {tmp["uwsgi"]};
    scgi_temp_path {tmp["scgi"]};
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ }}
    }}
}}
"""
    )
    proc = subprocess.Popen([binary, "-p", str(workdir), "-c", str(conf), "-e", "stderr"], stderr=subprocess.PIPE)
    try:
        try:
            wait_port(port)
        except TimeoutError:
            proc.kill()
            raise RuntimeError(f"nginx did not start: {proc.communicate()[1].decode(errors='replace')}") from None
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def moto_s3() -> Iterator[str]:
    """moto's S3 API server on a free loopback port (its server mode: real HTTP); yields the endpoint URL. Sets
    dummy credentials in the environment for the clients of this process while it runs."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise

    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        wait_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class FaultProxy:
    """An HTTP proxy on loopback in front of ``upstream`` (host, port) that injects one fault per request.

    Each client connection carries one request (the proxy asks the upstream to close after it). ``faults`` is the
    queue of faults for the next requests, consumed one per request: ``"drop"`` relays the response headers and
    ``drop_after`` bytes, then closes both sockets mid-body; ``"503"`` answers 503 without asking the upstream;
    ``"stall"`` reads the request and never answers (until the proxy stops); ``"slow"`` relays the response in
    pieces of 16 KB, ``slow_s`` apart (a download that can be killed midway); ``None`` relays faithfully.
    """

    def __init__(self, upstream: tuple[str, int], drop_after: int = 100_000, slow_s: float = 0.05) -> None:
        self.upstream = upstream
        self.drop_after = drop_after
        self.slow_s = slow_s
        self.faults: list[str | None] = []
        self.requests: list[tuple[str, str | None]] = []  # (request line, fault applied)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = int(self._sock.getsockname()[1])
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes accept(); close() alone does not
        with contextlib.suppress(OSError):
            self._sock.close()
        self._thread.join(5)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _handle(self, client: socket.socket) -> None:
        with contextlib.closing(client), contextlib.suppress(OSError):  # the client hung up (or was killed)
            head = b""
            while b"\r\n\r\n" not in head:
                data = client.recv(65536)
                if not data:
                    return
                head += data
            request, _, rest = head.partition(b"\r\n\r\n")
            lines = request.split(b"\r\n")
            fields = {
                ln.split(b":", 1)[0].strip().lower(): ln.split(b":", 1)[1].strip() for ln in lines[1:] if b":" in ln
            }
            if fields.get(b"expect", b"").lower() == b"100-continue":  # aiobotocore's PUTs wait to be told to go on
                client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                lines = [ln for ln in lines if not ln.lower().startswith(b"expect:")]
            while len(rest) < int(fields.get(b"content-length", b"0")) and (data := client.recv(65536)):
                rest += data  # an upload's body, relayed whole with its head
            with self._lock:
                fault = self.faults.pop(0) if self.faults else None
                self.requests.append((lines[0].decode(errors="replace"), fault))
            if fault == "503":
                client.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            if fault == "stall":
                self._stop.wait(120)
                return
            lines = [ln for ln in lines if not ln.lower().startswith(b"connection:")] + [b"Connection: close"]
            with socket.create_connection(self.upstream) as up:
                up.sendall(b"\r\n".join(lines) + b"\r\n\r\n" + rest)
                body_start, buf = None, b""
                while True:
                    data = up.recv(16384 if fault == "slow" else 65536)
                    if not data:
                        client.sendall(buf)  # a response shorter than drop_after: relayed whole
                        return
                    if fault == "drop":
                        buf += data
                        if body_start is None and b"\r\n\r\n" in buf:
                            body_start = buf.index(b"\r\n\r\n") + 4
                        if body_start is not None and len(buf) - body_start > self.drop_after:
                            client.sendall(buf[: body_start + self.drop_after])
                            client.shutdown(socket.SHUT_RDWR)  # mid-body: the client sees the stream end early
                            return
                        continue
                    client.sendall(data)
                    if fault == "slow":
                        time.sleep(self.slow_s)
