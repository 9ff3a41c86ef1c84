#!/usr/bin/env python3
"""Holds many idle and slowloris HTTP/1.1 connections open against a proxy (issue 19).

    scripts/idle_clients.py --port 18380 --idle 10000 --slow 1000 --hold 180 --status st.json

Idle connections each send one complete keep-alive request, read the whole response, and
then stay open without sending anything. Slowloris connections send a request head that
never ends, one byte every --interval seconds. Every connection watches for the server
closing it; the counts go to --status (JSON, rewritten every 0.5 s) with
"phase": "opening" | "ready" | "done". The script stops by itself after --hold seconds
from "ready" (or on SIGTERM/SIGINT), closing everything. Standard library only; 127.0.0.1.
"""
import argparse
import asyncio
import json
import os
import resource
import signal
import sys
import time


class Counts:
    def __init__(self):
        self.idle_open = 0  # idle connections that got their response and are still open
        self.idle_failed = 0  # could not connect, or no complete 2xx response
        self.idle_closed = 0  # closed by the server after becoming idle
        self.slow_open = 0
        self.slow_failed = 0  # could not connect
        self.slow_closed = 0  # closed by the server (a 408 or a plain close)
        self.slow_408 = 0
        self.phase = "opening"
        self.ready_at = None

    def doc(self):
        d = dict(self.__dict__)
        d["since_ready_s"] = None if self.ready_at is None else round(time.monotonic() - self.ready_at, 2)
        del d["ready_at"]
        return d


async def read_response(reader):
    """Reads one response with Content-Length or chunked framing; returns its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status


# The open connections: (writer, the read that ends when the server closes). Nothing waits
# on them one by one: a done-callback counts a close, so 11,000 connections cost no task
# wake-ups while idle.
OPEN = []


def watch_close(reader, writer, counts, kind):
    closed = asyncio.ensure_future(reader.read(64))

    def on_done(f):
        if f.cancelled():
            return
        setattr(counts, kind + "_open", getattr(counts, kind + "_open") - 1)
        setattr(counts, kind + "_closed", getattr(counts, kind + "_closed") + 1)
        try:
            if kind == "slow" and f.result().startswith(b"HTTP/1.1 408"):
                counts.slow_408 += 1
        except (OSError, asyncio.IncompleteReadError):
            pass

    closed.add_done_callback(on_done)
    OPEN.append((writer, closed))
    return closed


async def idle_conn(args, counts, stop):
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", args.port), 10)
    except (OSError, asyncio.TimeoutError):
        counts.idle_failed += 1
        return
    try:
        writer.write(f"GET {args.path} HTTP/1.1\r\nHost: {args.host}\r\nUser-Agent: idle-client\r\n\r\n".encode())
        await writer.drain()
        status = await asyncio.wait_for(read_response(reader), 10)
        if not 200 <= status < 300:
            counts.idle_failed += 1
            writer.close()
            return
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError):
        counts.idle_failed += 1
        writer.close()
        return
    counts.idle_open += 1
    watch_close(reader, writer, counts, "idle")


async def slow_conn(args, counts, stop, n):
    # A head that is never finished: the request line, a Host, then a long header sent
    # one byte at a time, with no blank line at the end.
    head = f"GET {args.path} HTTP/1.1\r\nHost: {args.host}\r\nX-Slow-{n}: " + "s" * 4000
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", args.port), 10)
    except (OSError, asyncio.TimeoutError):
        counts.slow_failed += 1
        return
    counts.slow_open += 1
    closed = watch_close(reader, writer, counts, "slow")
    try:
        for ch in head:
            if closed.done() or stop.done():
                return
            writer.write(ch.encode())
            await asyncio.sleep(args.interval)
    except OSError:
        pass


async def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="idle.test")
    p.add_argument("--path", default="/")
    p.add_argument("--idle", type=int, default=10000)
    p.add_argument("--slow", type=int, default=1000)
    p.add_argument("--interval", type=float, default=2.0, help="seconds between slowloris bytes")
    p.add_argument("--hold", type=float, default=120.0, help="seconds to hold after ready (upper bound)")
    p.add_argument("--batch", type=int, default=250, help="connections opened at a time")
    p.add_argument("--status", required=True)
    args = p.parse_args()

    want = args.idle + args.slow + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(want, soft), hard), hard))

    counts = Counts()
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))

    async def report():
        while True:
            tmp = args.status + ".tmp"
            with open(tmp, "w") as f:
                json.dump(counts.doc(), f)
            os.replace(tmp, args.status)
            if counts.phase == "done":
                return
            await asyncio.sleep(0.5)

    reporter = asyncio.ensure_future(report())
    tasks = []
    # Idle first, in batches: each batch has its response before the next one starts, so
    # the listener's backlog is never flooded.
    for start in range(0, args.idle, args.batch):
        if stop.done():
            break
        batch = [asyncio.ensure_future(idle_conn(args, counts, stop))
                 for _ in range(min(args.batch, args.idle - start))]
        tasks += batch
        deadline = time.monotonic() + 15
        while counts.idle_open + counts.idle_failed + counts.idle_closed < start + len(batch) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    for start in range(0, args.slow, args.batch):
        if stop.done():
            break
        tasks += [asyncio.ensure_future(slow_conn(args, counts, stop, start + i))
                  for i in range(min(args.batch, args.slow - start))]
        await asyncio.sleep(0.05)
    deadline = time.monotonic() + 15
    while counts.slow_open + counts.slow_failed + counts.slow_closed < args.slow and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    counts.phase = "ready"
    counts.ready_at = time.monotonic()
    try:
        await asyncio.wait_for(asyncio.shield(stop), args.hold)
    except asyncio.TimeoutError:
        pass
    if not stop.done():
        stop.set_result(None)
    for t in tasks:
        t.cancel()
    await asyncio.wait(tasks, timeout=10)
    for writer, closed in OPEN:
        closed.cancel()
        writer.close()
    counts.phase = "done"
    await reporter
    print(json.dumps(counts.doc()))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
