#!/usr/bin/env python3
"""bench/cache_server.py DIR [--port 0] [--delay-ms 50] [--ready-file F]

Serves the files under DIR (a Nix binary cache, read into memory at start) on 127.0.0.1
over HTTP/1.1 with keep-alive and any number of concurrent connections, answering every
request only after --delay-ms (a far-away cache). GET and HEAD; 404 for anything not
under DIR, 405 for other methods. Content types as a Nix cache sends them. Writes the
bound port to --ready-file once listening; stops on SIGTERM/SIGINT.

One asyncio event loop (about 60 us of CPU a request, a quarter of what
http.server's ThreadingHTTPServer spends, so the server takes little of a 2-core machine
from the client it measures); the delays are timers, not threads.

Not delayed and not counted: GET /_bench/stats (JSON counters: requests by kind, 404s,
bytes, connections, the most requests in flight at once, the server's CPU seconds, the
time from the first request to the last answer) and GET /_bench/reset (zeroes them).
"""
import argparse
import asyncio
import json
import os
import signal
import sys
import time

MAX_HEAD = 64 * 1024


class Stats:
    def __init__(self):
        self.reset()

    def reset(self):
        self.counts = {}
        self.not_found = 0
        self.bytes = 0
        self.connections = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.cpu0 = time.process_time()
        self.first = self.last = None

    def snapshot(self):
        return {
            "requests": sum(self.counts.values()),
            "by_kind": dict(sorted(self.counts.items())),
            "not_found": self.not_found,
            "bytes": self.bytes,
            "connections": self.connections,
            "max_in_flight": self.max_in_flight,
            "cpu_seconds": round(time.process_time() - self.cpu0, 3),
            "first_to_last_seconds": round(self.last - self.first, 3) if self.first is not None and self.last is not None else 0,
        }


def content_type(rel):
    if rel == "nix-cache-info":
        return b"text/x-nix-cache-info"
    if rel.endswith(".narinfo"):
        return b"text/x-nix-narinfo"
    if rel.startswith("nar/"):
        return b"application/x-nix-nar"
    return b"application/octet-stream"


def kind_of(method, rel):
    if rel.endswith(".narinfo"):
        k = "narinfo"
    elif rel.startswith("nar/"):
        k = "nar"
    elif rel == "nix-cache-info":
        k = "nix-cache-info"
    else:
        k = "other"
    return "%s %s" % (method, k)


def response(status, reason, ctype, body, head_only, close):
    head = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n" % (status, reason, ctype, len(body))
    head += b"Connection: close\r\n\r\n" if close else b"\r\n"
    return head if head_only else head + body


class Server:
    def __init__(self, files, delay):
        self.files = files
        self.delay = delay
        self.stats = Stats()

    async def handle(self, reader, writer):
        st = self.stats
        st.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.LimitOverrunError:
                    writer.write(response(431, b"Request Header Fields Too Large", b"text/plain", b"", False, True))
                    await writer.drain()
                    return
                lines = head.decode("latin-1").split("\r\n")
                parts = lines[0].split(" ")
                if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
                    writer.write(response(400, b"Bad Request", b"text/plain", b"", False, True))
                    await writer.drain()
                    return
                method, target, version = parts
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip().lower()
                conn = headers.get("connection", "")
                close = "close" in conn or (version == "HTTP/1.0" and "keep-alive" not in conn)
                length = int(headers.get("content-length", "0") or 0)
                if length:
                    await reader.readexactly(length)
                rel = target.split("?", 1)[0].split("#", 1)[0].lstrip("/")

                if rel in ("_bench/stats", "_bench/reset") and method == "GET":
                    if rel == "_bench/reset":
                        st.reset()
                    body = (json.dumps(st.snapshot()) + "\n").encode()
                    writer.write(response(200, b"OK", b"application/json", body, False, close))
                    await writer.drain()
                    if close:
                        return
                    continue

                st.counts[kind_of(method, rel)] = st.counts.get(kind_of(method, rel), 0) + 1
                st.in_flight += 1
                st.max_in_flight = max(st.max_in_flight, st.in_flight)
                if st.first is None:
                    st.first = time.monotonic()
                try:
                    if self.delay > 0:
                        await asyncio.sleep(self.delay)
                    body = self.files.get(rel)
                    if method not in ("GET", "HEAD"):
                        out = response(405, b"Method Not Allowed", b"text/plain", b"", False, close)
                    elif body is None:
                        st.not_found += 1
                        out = response(404, b"Not Found", b"text/plain", b"404 not found\n", method == "HEAD", close)
                    else:
                        out = response(200, b"OK", content_type(rel), body, method == "HEAD", close)
                        if method == "GET":
                            st.bytes += len(body)
                    writer.write(out)
                    await writer.drain()
                finally:
                    st.in_flight -= 1
                    st.last = time.monotonic()
                if close:
                    return
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()


async def serve(args, files):
    srv = Server(files, args.delay_ms / 1000.0)
    server = await asyncio.start_server(srv.handle, "127.0.0.1", args.port, backlog=1024, limit=MAX_HEAD)
    port = server.sockets[0].getsockname()[1]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.ready_file:
        tmp = args.ready_file + ".tmp"
        with open(tmp, "w") as f:
            f.write("%d\n" % port)
        os.replace(tmp, args.ready_file)
    print("cache_server: %d files from %s on 127.0.0.1:%d, delay %g ms" % (len(files), args.dir, port, args.delay_ms),
          file=sys.stderr)
    await stop.wait()
    server.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--delay-ms", type=float, default=50.0)
    ap.add_argument("--ready-file")
    args = ap.parse_args()
    root = os.path.abspath(args.dir)
    files = {}
    for d, _, names in os.walk(root):
        for n in names:
            full = os.path.join(d, n)
            with open(full, "rb") as f:
                files[os.path.relpath(full, root).replace(os.sep, "/")] = f.read()
    asyncio.run(serve(args, files))


if __name__ == "__main__":
    main()
