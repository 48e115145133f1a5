#!/usr/bin/env python3
"""The instance program of deployd's end-to-end tests. Naive on purpose: no
signal handling, no graceful shutdown.

GET /          "VERSION INSTANCE PID"
GET /healthz   200, or 500 with FAIL_HEALTH=1
GET /headers   the request's headers, as received
GET /slow?ms=N answers after N ms
GET /upgrade with "Upgrade: echo" answers 101, then echoes raw bytes

Knobs (environment): NO_LISTEN=1 never listens; START_DELAY_MS waits before
listening; CRASH_AFTER_MS exits with status 3 after that long.
With NOTIFY_SOCKET (health notify), the sd_notify protocol: READY_AFTER_MS
(listening at once) says STATUS=warming up, then READY=1 after that long
(never with READY_AFTER_MS=never); WATCHDOG_FOR_MS sends WATCHDOG=1 every
100 ms for that long, then stops.
"""
import http.server
import os
import socket
import socketserver
import sys
import threading
import time
import urllib.parse

env = os.environ
VERSION = env.get("VERSION", "?")
INSTANCE = env.get("INSTANCE", "?")
TAG = env.get("TAG", "")


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        url = urllib.parse.urlparse(self.path)
        status = 200
        if url.path == "/upgrade" and self.headers.get("Upgrade", "").lower() == "echo":
            self.send_response(101)
            self.send_header("Upgrade", "echo")
            self.send_header("Connection", "Upgrade")
            self.end_headers()
            while True:
                data = self.connection.recv(4096)
                if not data:
                    break
                self.connection.sendall(data)
            self.close_connection = True
            return
        if url.path == "/healthz":
            body = b"ok\n"
            if env.get("FAIL_HEALTH") == "1":
                status, body = 500, b"unhealthy\n"
        elif url.path == "/headers":
            body = str(self.headers).encode()
        elif url.path == "/slow":
            ms = int(urllib.parse.parse_qs(url.query).get("ms", ["1000"])[0])
            time.sleep(ms / 1000)
            body = f"slow {VERSION} {INSTANCE} {os.getpid()}\n".encode()
        else:
            body = f"{VERSION} {INSTANCE} {os.getpid()} {TAG}\n".encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        data = self.rfile.read(length)
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt, *args):
        pass


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


def notify(line):
    addr = env["NOTIFY_SOCKET"]
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        s.sendto(line.encode(), addr)
    finally:
        s.close()


def notifier():
    notify("STATUS=warming up")
    after = env.get("READY_AFTER_MS", "0")
    if after == "never":
        return
    time.sleep(int(after) / 1000)
    notify("READY=1\nSTATUS=serving")
    if env.get("WATCHDOG_FOR_MS"):
        until = time.time() + int(env["WATCHDOG_FOR_MS"]) / 1000
        while time.time() < until:
            notify("WATCHDOG=1")
            time.sleep(0.1)


def crash(ms):
    time.sleep(ms / 1000)
    print("crashing on purpose", flush=True)
    os._exit(3)


if __name__ == "__main__":
    print(f"app {VERSION} instance {INSTANCE} pid {os.getpid()}", flush=True)
    if env.get("CRASH_AFTER_MS"):
        threading.Thread(target=crash, args=(int(env["CRASH_AFTER_MS"]),), daemon=True).start()
    if env.get("NO_LISTEN") == "1":
        while True:
            time.sleep(3600)
    time.sleep(int(env.get("START_DELAY_MS", "0")) / 1000)
    if env.get("NOTIFY_SOCKET"):
        threading.Thread(target=notifier, daemon=True).start()
    Server((env.get("HOST", "127.0.0.1"), int(env["PORT"])), Handler).serve_forever()
