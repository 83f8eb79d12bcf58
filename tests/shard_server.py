"""A real HTTP server on loopback that serves shard files, with faults a test can switch on.

``ShardServer(root)`` runs the standard library's ThreadingHTTPServer in a thread on 127.0.0.1 (a free port). It
answers ``Range: bytes=N-`` with 206 unless ``ranges`` is off, and logs every request (path, requested start byte,
status). Faults: ``drop(after_bytes, times)`` closes the connection after that many body bytes on the next ``times``
requests; ``stall(after_bytes, seconds)`` stops sending for that long after that many body bytes; ``missing`` names
files answered 404.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Request:
    path: str
    range_start: int | None  # the N of "Range: bytes=N-", None without a Range header
    status: int


class ShardServer:
    """See the module docstring; use as a context manager (``with ShardServer(root) as server``)."""

    def __init__(self, root: str):
        self.root = root
        self.ranges = True
        self.missing: set[str] = set()
        self.redirects: dict[str, str] = {}  # name -> Location of a 302
        self.drop_after_bytes: int | None = None
        self.drops_left = 0
        self.stall_after_bytes: int | None = None
        self.stall_s = 0.0
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()  # ends stalls at teardown
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/{name}"

    def drop(self, after_bytes: int, times: int) -> None:
        self.drop_after_bytes, self.drops_left = after_bytes, times

    def stall(self, after_bytes: int, seconds: float) -> None:
        self.stall_after_bytes, self.stall_s = after_bytes, seconds

    def __enter__(self) -> ShardServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet: the test reads server.requests instead
                pass

            def do_GET(self) -> None:
                name = self.path.lstrip("/")
                path = os.path.join(server.root, name)
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
                start = int(match.group(1)) if match else None
                if name in server.redirects:
                    server._log(name, start, 302)
                    self.send_response(302)
                    self.send_header("Location", server.redirects[name])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if name in server.missing or not os.path.isfile(path):
                    server._log(name, start, 404)
                    self.send_error(404)
                    return
                with open(path, "rb") as f:
                    data = f.read()
                if start is not None and server.ranges:
                    body = data[start:]
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                    status = 206
                else:
                    body = data
                    self.send_response(200)
                    status = 200
                server._log(name, start, status)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes" if server.ranges else "none")
                self.end_headers()
                with server._lock:
                    drop = server.drops_left > 0
                    server.drops_left -= drop
                if drop:
                    body = body[: server.drop_after_bytes]
                if server.stall_after_bytes is not None:
                    self.wfile.write(body[: server.stall_after_bytes])
                    self.wfile.flush()
                    server._stop.wait(server.stall_s)
                    body = body[server.stall_after_bytes:]
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass
                self.close_connection = True

        return Handler

    def _log(self, name: str, start: int | None, status: int) -> None:
        with self._lock:
            self.requests.append(Request(name, start, status))
