"""A local stand-in for the model zoo: a real `ThreadingHTTPServer` on 127.0.0.1 (random port) that
serves fixture tarballs, honours `Range: bytes=N-`, counts requests, and can misbehave on purpose
(answer 404/500, drop the connection mid-file, ignore Range). Never contacts the real zoo."""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_RANGE = re.compile(r"bytes=(\d+)-$")


@dataclass
class ZooServer:
    """State shared with the request handler; tests edit it between requests."""

    port: int = 0
    files: dict[str, bytes] = field(default_factory=dict)
    status: dict[str, int] = field(default_factory=dict)  # name -> HTTP status to answer instead
    drop_after: dict[str, list[int]] = field(default_factory=dict)  # name -> byte counts, one per request
    ignore_range: set[str] = field(default_factory=set)
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (name, Range header)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def serve(self, name: str, data: bytes | Path) -> None:
        self.files[name] = data.read_bytes() if isinstance(data, Path) else data

    def count(self, name: str | None = None) -> int:
        with self.lock:
            return sum(1 for requested, _ in self.requests if name is None or requested == name)


def _handler(state: ZooServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # keep test output quiet
            pass

        def do_GET(self):
            name = self.path.lstrip("/")
            header = self.headers.get("Range")
            with state.lock:
                state.requests.append((name, header))
                status = state.status.get(name)
                drops = state.drop_after.get(name)
                drop = drops.pop(0) if drops else None
            if status is not None:
                self.send_error(status)
                return
            data = state.files.get(name)
            if data is None:
                self.send_error(404)
                return
            start = 0
            match = _RANGE.match(header or "")
            if match and name not in state.ignore_range:
                start = int(match[1])
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if drop is not None:  # announce everything, send part of it, hang up
                self.wfile.write(body[:drop])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(body)

    return Handler


@contextmanager
def running_zoo_server() -> Iterator[ZooServer]:
    """Start a server thread; stop it on exit. Test modules wrap this in a `zoo_server` fixture."""
    state = ZooServer()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="zoo-server", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
