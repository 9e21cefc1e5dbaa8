"""A small HTTP proxy for an S3 server that misbehaves for a while: it answers 503 SlowDown or resets the
connection on a share of the first requests, then forwards everything. Loopback only; bounded by count.

``rule(method, path, headers)`` decides per request instead (the lease's tests): None forwards it, "reset" resets
the connection, "503" answers SlowDown, "lost" forwards it and then resets the connection (the request took effect,
its response is lost); it may edit ``headers`` first, e.g. drop If-Match as a store that ignores it."""

from __future__ import annotations

import http.client
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}


class FaultyProxy:
    def __init__(self, upstream: str, faulty_requests: int = 60, every: int = 2, rule=None):
        self.upstream = urlparse(upstream)
        self.faulty_requests, self.every, self.rule = faulty_requests, every, rule
        self.seen = self.errors_503 = self.resets = 0
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path with query, Authorization)
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self):
                body = self._body()
                with proxy.lock:
                    proxy.seen += 1
                    n = proxy.seen
                    proxy.requests.append((self.command, self.path, self.headers.get("Authorization")))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                if proxy.rule is not None:
                    action = proxy.rule(self.command, self.path, headers)
                else:
                    fault = n <= proxy.faulty_requests and n % proxy.every == 0
                    action = ("reset" if (n // proxy.every) % 2 else "503") if fault else None
                if action == "reset":
                    self._reset()
                    return
                if action == "503":
                    with proxy.lock:
                        proxy.errors_503 += 1
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if action == "lost":
                    self._reset()
                    return
                self.send_response_only(resp.status)  # the server's own Date and Server headers follow
                for k, v in resp.getheaders():
                    if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                # a HEAD answer has no body but must carry the object's length
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _reset(self):
                with proxy.lock:
                    proxy.resets += 1
                # RST instead of a response: what a dropped connection looks like to the client
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                self.close_connection = True

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
