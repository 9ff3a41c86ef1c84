#!/usr/bin/env python3
"""Helpers for scripts/soak.sh: a WebSocket echo upstream, a WebSocket load client, and the
summary of the gateway's JSON access log.

    soak_clients.py ws-server --port 18384
    soak_clients.py ws-load --url ws://127.0.0.1:18380/ws/echo --sessions 4 --seconds 60
    soak_clients.py access-summary --log gateway.log --restarts restarts.log --restarting soak-3

ws-server answers GET /health with 200 (for the registry's HTTP check) and echoes every
message. ws-load runs SESSIONS concurrent sessions for SECONDS (then stops by itself): each
connects, sends --messages messages --gap seconds apart, checks each echo, closes and starts
again; it prints one JSON line (sessions, failures, messages, p99 of message round trips,
the first few failures). access-summary prints the 5xx answers of the access log by route,
instance and tries, and how far each was from the nearest restart of --restarting.
Needs the `websockets` package (pip install websockets) for the two WebSocket commands.
"""
import argparse
import asyncio
import json
import signal
import sys
import time


def percentile(values, p):
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


async def ws_server(args):
    from websockets.asyncio.server import serve

    async def echo(ws):
        try:
            async for message in ws:
                await ws.send(message)
        except Exception:  # a client gone mid-message is not the server's problem
            pass

    def health(connection, request):
        if request.path == "/health":
            return connection.respond(200, "ok\n")
        return None

    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    async with serve(echo, "127.0.0.1", args.port, process_request=health):
        await stop
    return 0


async def ws_load(args):
    from websockets.asyncio.client import connect

    rtts = []
    stats = {"sessions": 0, "failed": 0, "messages": 0}
    failures = []
    end = time.monotonic() + args.seconds

    async def session(n):
        while time.monotonic() < end:
            try:
                async with connect(args.url, open_timeout=5, close_timeout=2,
                                   additional_headers=args.header) as ws:
                    for i in range(args.messages):
                        msg = f"soak {n} {i} " + "x" * 100
                        t0 = time.monotonic()
                        await ws.send(msg)
                        got = await asyncio.wait_for(ws.recv(), 5)
                        rtts.append((time.monotonic() - t0) * 1000)
                        if got != msg:
                            raise ValueError(f"echo mismatch: {got[:40]!r}")
                        stats["messages"] += 1
                        await asyncio.sleep(args.gap)
                stats["sessions"] += 1
            except Exception as e:  # every failure is counted and the first few named
                stats["failed"] += 1
                if len(failures) < 5:
                    failures.append(f"{time.strftime('%H:%M:%S')} {type(e).__name__}: {e}")
                await asyncio.sleep(0.2)

    await asyncio.gather(*(session(n) for n in range(args.sessions)))
    stats["p99_ms"] = round(percentile(rtts, 99), 3)
    stats["failures"] = failures
    print(json.dumps(stats))
    return 0


def access_summary(args):
    restarts = []
    if args.restarts:
        with open(args.restarts) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2:
                    restarts.append((float(parts[0]), parts[1]))
    kills = [t for t, what in restarts if what == "stop"]
    total = 0
    retried = 0
    bad = {}
    lines = []
    with open(args.log, errors="replace") as f:
        for line in f:
            if not line.startswith("{"):
                continue
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if doc.get("target") != "access":
                continue
            total += 1
            tries = int(doc.get("tries", 0))
            if tries > 1:
                retried += 1
            status = int(doc.get("status", 0))
            if status < 500:
                continue
            key = (doc.get("route", ""), status, doc.get("upstream", ""), tries)
            bad[key] = bad.get(key, 0) + 1
            ts = doc.get("timestamp", "")
            lines.append((ts, doc))
    out = {"requests": total, "retried": retried,
           "5xx": [{"route": r, "status": s, "upstream": u, "tries": t, "count": c}
                   for (r, s, u, t), c in sorted(bad.items())]}
    # How far each 5xx came after the last stop of the restarting instance.
    gaps = []
    for ts, doc in lines:
        try:
            from datetime import datetime
            t = datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
        except ValueError:
            continue
        before = [k for k in kills if k <= t + 0.05]
        gaps.append(round(t - before[-1], 3) if before else None)
    out["seconds_after_last_stop"] = gaps[:50]
    out["not_retryable_on_restarting"] = sum(
        c for (r, s, u, t), c in bad.items()
        if r in args.streamed_routes and t == 1
        and (u == args.restarting or u.endswith("/" + args.restarting)))
    print(json.dumps(out))
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("ws-server")
    s.add_argument("--port", type=int, required=True)
    s = sub.add_parser("ws-load")
    s.add_argument("--url", required=True)
    s.add_argument("--sessions", type=int, default=4)
    s.add_argument("--seconds", type=float, default=60)
    s.add_argument("--messages", type=int, default=20)
    s.add_argument("--gap", type=float, default=0.1)
    s.add_argument("--header", action="append", default=[], type=lambda h: tuple(h.split(": ", 1)))
    s = sub.add_parser("access-summary")
    s.add_argument("--log", required=True)
    s.add_argument("--restarts")
    s.add_argument("--restarting", default="")
    s.add_argument("--streamed-routes", nargs="*", default=[],
                   help="routes whose bodies are too large to replay (a single try)")
    args = p.parse_args()
    if args.cmd == "ws-server":
        return asyncio.run(ws_server(args))
    if args.cmd == "ws-load":
        return asyncio.run(ws_load(args))
    return access_summary(args)


if __name__ == "__main__":
    sys.exit(main())
