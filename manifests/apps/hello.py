#!/usr/bin/env python3
"""A small HTTP service for deployd's examples.

GET /healthz answers 200 "ok" (503 when the environment says HEALTHY=no);
GET / answers with the service, version and instance serving it;
GET /slow?ms=N answers after N milliseconds. It is naive
on purpose: no signal handling, no graceful shutdown. deployd drains it before
stopping it, so it does not need any.
"""
import http.server
import os
import socketserver
import time
import urllib.parse

SERVICE = os.environ.get("SERVICE", "?")
VERSION = os.environ.get("VERSION", "?")
INSTANCE = os.environ.get("INSTANCE", "?")
GREETING = os.environ.get("GREETING", "hello")
HEALTHY = os.environ.get("HEALTHY", "yes") != "no"


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        url = urllib.parse.urlparse(self.path)
        status = 200
        if url.path == "/healthz":
            body = b"ok\n" if HEALTHY else b"unhealthy\n"
            status = 200 if HEALTHY else 503
        elif url.path == "/slow":
            ms = int(urllib.parse.parse_qs(url.query).get("ms", ["1000"])[0])
            time.sleep(ms / 1000)
            body = f"slow {ms}ms from {VERSION} instance {INSTANCE}\n".encode()
        else:
            body = f"{GREETING} from {SERVICE} {VERSION} instance {INSTANCE}\n".encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        pass


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


if __name__ == "__main__":
    port = int(os.environ["PORT"])
    print(f"{SERVICE} {VERSION} instance {INSTANCE} listening on {port}", flush=True)
    Server((os.environ.get("HOST", "127.0.0.1"), port), Handler).serve_forever()
