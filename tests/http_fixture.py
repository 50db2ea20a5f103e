"""A local HTTP file server for download tests: Range support, fault injection, request accounting.

Usage::

    with FixtureServer() as srv:
        srv.add("/a.bin", data, drop_after=1000)   # first GET is cut after 1000 bytes
        download(srv.url("/a.bin"), dest)
        assert srv.count("/a.bin") == 2

or through the ``http_server`` pytest fixture (``from http_fixture import http_server`` in a test module).
Only ever binds 127.0.0.1 on an ephemeral port.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest


@dataclass
class Resource:
    """One served file and its faults.

    * ``drop_after``: cut the next ``drop_times`` GETs after that many body bytes (with ``ignore_range`` every body
      starts at byte 0, so this cuts at the same file byte each time);
    * ``fail_500``: answer 500 that many times first; ``status``: always answer this status (e.g. 404);
    * ``ignore_range``: answer 200 with the whole body even when a Range is asked for;
    * ``close_delimited``: send no Content-Length; the body ends when the server closes the connection (HTTP/1.0
      style), so a cut body looks like a complete one to the client;
    * ``changed_data``: serve these bytes instead of ``data`` from GET number ``change_after + 1`` on (the remote
      file changed between requests);
    * ``validators``: send an ``ETag`` and ``Last-Modified`` of the current content; ``honor_if_range``: answer a
      Range request whose ``If-Range`` no longer matches with 200 and the whole body (RFC 9110), else ignore it.
    """

    data: bytes
    drop_after: int | None = None
    drop_times: int = 1
    fail_500: int = 0
    status: int | None = None
    ignore_range: bool = False
    close_delimited: bool = False
    changed_data: bytes | None = None
    change_after: int = 1
    validators: bool = False
    honor_if_range: bool = False
    gets: int = 0

    def current(self) -> tuple[bytes, str, str]:
        """The content served now, with its ETag and Last-Modified."""
        changed = self.changed_data is not None and self.gets > self.change_after
        data = self.changed_data if changed else self.data
        etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
        modified = "Tue, 02 Jan 2024 00:00:00 GMT" if changed else "Mon, 01 Jan 2024 00:00:00 GMT"
        return data, etag, modified


@dataclass(frozen=True)
class RequestRecord:
    path: str
    range: str | None
    status: int
    if_range: str | None = None


_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class FixtureServer:
    """Threaded ``http.server`` on 127.0.0.1 serving in-memory files, usable as a context manager."""

    def __init__(self) -> None:
        self.resources: dict[str, Resource] = {}
        self.requests: list[RequestRecord] = []
        self.bytes_served: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- configuration -------------------------------------------------------------------------------------------
    def add(self, path: str, data: bytes, **faults: object) -> str:
        """Serve ``data`` at ``path`` (with optional :class:`Resource` faults); returns its URL."""
        if not path.startswith("/"):
            path = "/" + path
        self.resources[path] = Resource(data, **faults)  # type: ignore[arg-type]
        return self.url(path)

    def url(self, path: str = "/") -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}{path if path.startswith('/') else '/' + path}"

    # -- accounting ----------------------------------------------------------------------------------------------
    def count(self, path: str | None = None) -> int:
        """Number of requests (to ``path``, or in total)."""
        with self._lock:
            return sum(1 for r in self.requests if path is None or r.path == path)

    def for_path(self, path: str) -> list[RequestRecord]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()
            self.bytes_served.clear()

    # -- lifecycle -----------------------------------------------------------------------------------------------
    def start(self) -> "FixtureServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
                pass

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _record(self, status: int) -> None:
                with server._lock:
                    server.requests.append(RequestRecord(self.path, self.headers.get("Range"), status,
                                                         self.headers.get("If-Range")))

            def _plain(self, status: int) -> None:
                self._record(status)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True

            def _serve(self, body: bool) -> None:
                res = server.resources.get(self.path)
                if res is None:
                    return self._plain(404)
                with server._lock:
                    if body:
                        res.gets += 1
                    if res.status is not None:
                        status = res.status
                    elif res.fail_500 > 0:
                        res.fail_500 -= 1
                        status = 500
                    else:
                        status = 200
                    drop = res.drop_after if body and res.drop_times > 0 and status == 200 else None
                    if drop is not None:
                        res.drop_times -= 1
                    data, etag, modified = res.current()
                if status != 200:
                    return self._plain(status)
                span = self._range(res, len(data), etag, modified)
                if span is None:
                    start, chunk = 0, data
                else:
                    start, end = span
                    if start >= len(data):
                        return self._unsatisfiable(len(data))
                    chunk, status = data[start:end], 206
                self._record(status)
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Accept-Ranges", "none" if res.ignore_range else "bytes")
                if res.validators:
                    self.send_header("ETag", etag)
                    self.send_header("Last-Modified", modified)
                if not res.close_delimited:
                    self.send_header("Content-Length", str(len(chunk)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{start + len(chunk) - 1}/{len(data)}")
                if drop is not None or res.close_delimited:
                    self.send_header("Connection", "close")
                self.end_headers()
                if body:
                    out = chunk if drop is None else chunk[:drop]
                    self._send_body(out, cut=drop is not None or res.close_delimited)

            def _range(self, res: Resource, size: int, etag: str, modified: str) -> tuple[int, int] | None:
                """The byte range [start, end) a Range request asks for, or ``None`` to send the whole file."""
                match = _RANGE.match(self.headers.get("Range", "") or "")
                if not match or res.ignore_range:
                    return None
                if_range = self.headers.get("If-Range")
                if res.honor_if_range and if_range is not None and if_range not in (etag, modified):
                    return None
                start = int(match.group(1))
                end = int(match.group(2)) + 1 if match.group(2) else size
                return start, min(end, size)

            def _unsatisfiable(self, size: int) -> None:
                self._record(416)
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _send_body(self, out: bytes, cut: bool) -> None:
                with server._lock:  # counted before sending: the client may return before this thread resumes
                    server.bytes_served[self.path] += len(out)
                try:
                    self.wfile.write(out)
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    return
                if cut:  # end the body by closing the connection
                    self.close_connection = True
                    try:
                        self.connection.shutdown(2)
                    except OSError:
                        pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fixture-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "FixtureServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def dead_url(path: str = "/file") -> str:
    """A URL on 127.0.0.1 where nothing listens (a port just released by the OS)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"


@pytest.fixture
def http_server() -> Iterator[FixtureServer]:
    """A started :class:`FixtureServer`, stopped after the test."""
    with FixtureServer() as srv:
        yield srv
