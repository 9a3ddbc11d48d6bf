"""HTTP prediction latency and throughput of a running ``streamlearn serve``, over loopback.

    .venv/bin/python -m bench.http_latency [--rate 500] [--seconds 20] [--batch 1000] [--clients 2]

Setup: an embedded broker and a ``streamlearn serve`` subprocess (default configuration, default
learner); the ``mixed`` stream (10 numeric + 3 categorical features) is written to it and the
bench waits until the model has learned it, so predictions run on a trained model of that shape.
The ingest loop is idle while the HTTP figures are taken.

- single: one instance per request, sent open-loop at a fixed ``--rate`` (requests are scheduled
  at ``t0 + i / rate`` whether or not earlier ones have answered; latency counts from the
  scheduled time, so queueing behind a slow request is included — no coordinated omission);
- batch: ``--clients`` closed-loop clients post batches of ``--batch`` instances back to back for
  ``--seconds``; instances/s = instances answered / elapsed.

The client is a small asyncio HTTP/1.1 client on raw sockets (up to 64 keep-alive connections,
opened on demand), so that client overhead stays far below the server's. Prints one JSON line, writes
``bench/results/http_<name>.json`` and rebuilds ``bench/results/http.md`` from every saved run.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np
import orjson

from service.broker import EmbeddedBroker, free_port
from service.streams import iter_stream, make_producer, produce

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
REPO = pathlib.Path(__file__).resolve().parent.parent


class Connection:
    """One keep-alive HTTP/1.1 connection; ``post`` returns (status, body)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str):
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer, f"{host}:{port}")

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


class Pool:
    """Keep-alive connections, opened on demand up to ``size``; beyond that requests queue for one
    (as behind any client's pool), and the queueing shows in the latency, which counts from the
    scheduled send time."""

    def __init__(self, host: str, port: int, size: int = 64):
        self.host, self.port = host, port
        self.idle: list[Connection] = []
        self.slots = asyncio.Semaphore(size)
        self.opened = 0

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        async with self.slots:
            conn = self.idle.pop() if self.idle else None
            if conn is not None:
                try:
                    status, payload = await conn.post(path, body)
                except (asyncio.IncompleteReadError, ConnectionError):
                    conn.close()  # the server closed an idle keep-alive connection: retry on a new one
                    conn = None
            if conn is None:
                conn = await Connection.open(self.host, self.port)
                self.opened += 1
                status, payload = await conn.post(path, body)
            self.idle.append(conn)
            return status, payload

    def close(self) -> None:
        for conn in self.idle:
            conn.close()


def percentiles(latencies_s: list[float]) -> dict[str, float]:
    ms = np.asarray(latencies_s) * 1000.0
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max())}


async def open_loop_single(port: int, rate: float, seconds: float, instances: list[dict]) -> dict:
    pool = Pool("127.0.0.1", port)
    path = "/v1/models/default/predict"
    bodies = [orjson.dumps({"instances": [{"id": str(i), "features": x}]}) for i, x in enumerate(instances)]
    await pool.post(path, bodies[0])  # warm: one connection open, code paths hot
    n = int(rate * seconds)
    latencies: list[float] = [0.0] * n
    errors = 0
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.05

    async def one(i: int) -> None:
        nonlocal errors
        scheduled = t0 + i / rate
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        status, _ = await pool.post(path, bodies[i % len(bodies)])
        latencies[i] = loop.time() - scheduled
        errors += status != 200

    await asyncio.gather(*(one(i) for i in range(n)))
    elapsed = loop.time() - t0
    pool.close()
    return {"requests": n, "achieved_rate": n / elapsed, "errors": errors, "connections": pool.opened,
            **percentiles(latencies)}


async def closed_loop_batches(port: int, clients: int, batch: int, seconds: float, instances: list[dict]) -> dict:
    path = "/v1/models/default/predict"
    bodies = [orjson.dumps({"instances": [{"id": str(i * batch + j), "features": x}
                                          for j, x in enumerate(instances[i * batch:(i + 1) * batch])]})
              for i in range(len(instances) // batch)]
    conns = [await Connection.open("127.0.0.1", port) for _ in range(clients)]
    for conn in conns:
        status, payload = await conn.post(path, bodies[0])  # warm
        assert status == 200 and len(orjson.loads(payload)["predictions"]) == batch
    latencies: list[float] = []
    errors = 0
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    stop = t0 + seconds

    async def client(conn: Connection, offset: int) -> int:
        nonlocal errors
        done = 0
        for k in itertools.count(offset):
            if loop.time() >= stop:
                return done
            start = loop.time()
            status, _ = await conn.post(path, bodies[k % len(bodies)])
            latencies.append(loop.time() - start)
            if status == 200:
                done += batch
            else:
                errors += 1
        return done

    answered = sum(await asyncio.gather(*(client(c, i) for i, c in enumerate(conns))))
    elapsed = loop.time() - t0
    for conn in conns:
        conn.close()
    return {"batch": batch, "clients": clients, "requests": len(latencies), "errors": errors,
            "instances_per_s": answered / elapsed, **percentiles(latencies)}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_serve(bootstrap: str, state_dir: str, port: int, log_path: pathlib.Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLEARN_")}
    env.update(STREAMLEARN_KAFKA_BOOTSTRAP=bootstrap, STREAMLEARN_HTTP_PORT=str(port),
               STREAMLEARN_STATE_DIR=state_dir, STREAMLEARN_LOG_LEVEL="WARNING", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "service", "serve"], cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("serve not ready")
        time.sleep(0.2)


def wait_learned(port: int, n: int, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = httpx.get(f"http://127.0.0.1:{port}/v1/models/default", timeout=10).json()
        if status["events"]["learned"] >= n:
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"learned only {status['events']['learned']} of {n}")
        time.sleep(0.5)


def report(results: list[dict]) -> str:
    """``bench/results/http.md``: one table row per named run (``bench/results/http_<name>.json``)."""
    rows, notes = [], []
    for r in results:
        if r.get("note"):
            notes.append(f"- {r['name']}: {r['note']}")
        s, b = r["single"], r["batch"]
        rows.append(f"| {r['name']} | {r['machine']}; load {r['load_average_1m']:.1f} | {r['cpus_used']} "
                    f"| {r['learner_device']} | {s['achieved_rate']:.0f} | {s['p50_ms']:.1f} / {s['p99_ms']:.1f} "
                    f"/ {s['max_ms']:.0f} | {s['server_cpu_ms_per_request']:.2f} | {b['instances_per_s']:,.0f} "
                    f"| {b['p50_ms']:.0f} / {b['p99_ms']:.0f} | {b['instances_per_server_cpu_s']:,.0f} |")
    return f"""# HTTP prediction latency and throughput

`python -m bench.http_latency [--name NAME]`: an embedded broker and a `streamlearn serve`
subprocess (default configuration, default learner, trained first on 20,000 events of the `mixed`
stream: 10 numeric + 3 categorical features); then, over loopback with an asyncio raw-socket
HTTP/1.1 client on the same host:

- single: one instance per request, open loop at a fixed 500 requests/s, latency from each
  request's scheduled send time (target: p99 ≤ 25 ms);
- batch: 2 closed-loop clients posting batches of 1,000 instances (target: ≥ 50,000 instances/s).

Server CPU is the serve process's user + system time (all threads, from /proc) per request: other
work on the host does not bend it the way it bends wall-clock latency. "load" is the host's 1-min
load average when the run ended.

| run | host | CPUs | learner on | achieved req/s | single p50 / p99 / max ms | server CPU ms per single request | batch instances/s | batch p50 / p99 ms | instances per server CPU-s |
|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

{chr(10).join(notes)}

Each row's JSON (every figure, the exact command) is `bench/results/http_<run>.json`.
"""


def write_report() -> None:
    results = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("http_*.json"))]
    (RESULTS / "http.md").write_text(report(results))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--train-events", type=int, default=20_000)
    parser.add_argument("--name", default="local", help="the run's name: bench/results/http_<name>.json")
    parser.add_argument("--note", default="", help="how and where this run was made (goes into http.md)")
    parser.add_argument("--no-write", action="store_true", help="print the JSON line only")
    parser.add_argument("--report-only", action="store_true", help="rewrite http.md from the saved runs")
    args = parser.parse_args(argv)
    if args.report_only:
        write_report()
        return {}

    instances = [x for x, _ in itertools.islice(iter_stream("mixed", seed=99), max(10 * args.batch, 5000))]
    with tempfile.TemporaryDirectory() as state, EmbeddedBroker(port=0) as broker:
        port = free_port()
        proc = start_serve(broker.bootstrap, state, port, pathlib.Path(state) / "serve.log")
        try:
            producer = make_producer(broker.bootstrap)
            produce(producer, "mixed", args.train_events, events_topic="streamlearn.events",
                    labels_topic="streamlearn.labels", seed=3)
            producer.close()
            trained = wait_learned(port, args.train_events)
            time.sleep(1.0)  # the loop publishes its last snapshot and goes idle
            cpu0 = cpu_seconds(proc.pid)
            single = asyncio.run(open_loop_single(port, args.rate, args.seconds, instances))
            cpu1 = cpu_seconds(proc.pid)
            batch = asyncio.run(closed_loop_batches(port, args.clients, args.batch, args.seconds, instances))
            cpu2 = cpu_seconds(proc.pid)
            # CPU the server spent per unit of work: a figure that other work on the machine does not bend.
            single["server_cpu_ms_per_request"] = (cpu1 - cpu0) * 1000 / (single["requests"] + 1)
            batch["server_cpu_ms_per_request"] = (cpu2 - cpu1) * 1000 / (batch["requests"] + args.clients)
            batch["instances_per_server_cpu_s"] = args.batch / (batch["server_cpu_ms_per_request"] / 1000)
        finally:
            proc.terminate()
            proc.wait(60)
    import torch

    result = {
        "bench": "http_latency",
        "name": args.name,
        "note": args.note,
        "command": "python -m bench.http_latency " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "load_average_1m": os.getloadavg()[0],  # other work on the machine while this ran
        "cpus_used": len(os.sched_getaffinity(0)),
        "learner_device": "cuda" if torch.cuda.is_available() else "cpu",  # the default learner's device "auto"
        "trained_events": trained["events"]["learned"],
        "rate": args.rate,
        "single": single,
        "batch": batch,
        "targets": {"p99_ms": 25, "instances_per_s": 50_000},
    }
    print(json.dumps(result))
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"http_{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
        write_report()
    return result


if __name__ == "__main__":
    main()

