"""`deepship serve` and `deepship bench serve`: argument parsing, the uvicorn launch, the load benchmark.

Importing this module is cheap (argparse only): `deepship.cli` builds its parser from
`add_serve_parser` and `add_bench_serve_options`; FastAPI, uvicorn and httpx load when a command runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from deepship.errors import ConfigError, DeepshipError


# ------------------------------------------------------------------------------------- serve
def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    serve = subparsers.add_parser("serve", help="serve a model package over HTTP (no torch needed)")
    serve.add_argument("--package", required=True, help="model package folder written by export")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1; 0.0.0.0 for all)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1,
                       help="worker processes, each with its own model copy (default 1; SIGHUP then restarts them)")
    serve.add_argument("--settings", default=None, help="YAML file of serve settings (docs/serving.md)")
    serve.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                       help="override a serve setting, e.g. --set max_wait_ms=2 max_items=16")
    serve.add_argument("--no-batching", action="store_true", help="one model call per request (batching=false)")
    serve.add_argument("--max-batch-size", type=int, default=None, help="inputs per model call (default 32)")
    serve.add_argument("--max-wait-ms", type=float, default=None,
                       help="extra batching window (default 0: a batch is what queued up while the model ran)")
    serve.add_argument("--log", default=None, metavar="PATH", help="prediction log, JSON lines (default: none)")
    serve.add_argument("--log-inputs", action="store_true", help="also log raw inputs (off by default: privacy)")
    serve.add_argument("--admin", action="store_true", help="enable POST /admin/reload and /admin/rollback")
    serve.add_argument("--no-access-log", action="store_true", help="no per-request access log lines")
    serve.set_defaults(func=cmd_serve)
    return serve


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """The convenience flags as `--set` pairs, applied last (flags beat --set, which beats --settings)."""
    pairs = []
    if args.no_batching:
        pairs.append("batching=false")
    if args.max_batch_size is not None:
        pairs.append(f"max_batch_size={args.max_batch_size}")
    if args.max_wait_ms is not None:
        pairs.append(f"max_wait_ms={float(args.max_wait_ms)}")
    if args.log is not None:
        pairs.append(f"log_path={json.dumps(args.log)}")  # quoted: a path is a string even if it looks like a number
    if args.log_inputs:
        pairs.append("log_inputs=true")
    if args.admin:
        pairs.append("admin=true")
    return pairs


def cmd_serve(args: argparse.Namespace) -> int:
    from deepship.runtime.predictor import Predictor
    from deepship.serving.settings import load_settings

    settings = load_settings(args.settings, [*args.set, *flag_overrides(args)])
    if args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: must be at least 1")
    Predictor.load(args.package)  # fail here with one clear line (exit 2), not in a worker's traceback
    import uvicorn

    options = {"host": args.host, "port": args.port, "access_log": not args.no_access_log,
               "timeout_graceful_shutdown": int(settings.graceful_timeout_s) or 1}
    if args.workers == 1:
        from deepship.serving.app import create_app

        uvicorn.run(create_app(args.package, settings), **options)
        return 0
    # Several processes: uvicorn imports the app in each from a factory; the settings travel in the environment.
    os.environ.update({"DEEPSHIP_SERVE_PACKAGE": str(Path(args.package).resolve()),
                       "DEEPSHIP_SERVE_SETTINGS": settings.model_dump_json(),
                       "DEEPSHIP_SERVE_WORKERS": str(args.workers)})
    own_metrics_dir = "PROMETHEUS_MULTIPROC_DIR" not in os.environ  # each worker writes its metrics there
    if own_metrics_dir:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="deepship-metrics-")
    try:
        uvicorn.run("deepship.serving.app:create_app_from_env", factory=True, workers=args.workers, **options)
    finally:
        if own_metrics_dir:
            shutil.rmtree(os.environ.pop("PROMETHEUS_MULTIPROC_DIR"), ignore_errors=True)
    return 0


# ------------------------------------------------------------------------------------- bench
def add_bench_serve_options(bench: argparse.ArgumentParser) -> None:
    """Options of `deepship bench serve`, added to the existing `bench` parser."""
    group = bench.add_argument_group("serve (HTTP load test on loopback)")
    group.add_argument("--package", default=None, help="serve, monitor: model package to load-test or monitor")
    group.add_argument("--concurrency", default="1,4,16,64", help="serve: concurrent clients per level (default 1,4,16,64)")
    group.add_argument("--duration", type=float, default=3.0, help="serve: seconds per level at most (default 3)")
    group.add_argument("--requests", type=int, default=2000, help="serve: requests per level at most (default 2000)")
    group.add_argument("--batching", default="on,off", help="serve: modes to compare (default on,off)")
    group.add_argument("--items", type=int, default=1, help="serve: inputs per request (default 1)")


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from deepship.bench import print_results

    if not args.package:
        raise ConfigError("bench serve: --package is required; give a folder written by `deepship export`")
    levels = parse_int_list(args.concurrency, "--concurrency")
    modes = [m.strip() for m in args.batching.split(",") if m.strip()]
    if not modes or set(modes) - {"on", "off"}:
        raise ConfigError(f"--batching {args.batching}: give on, off or on,off")
    if args.duration <= 0 or args.requests < 1 or args.items < 1:
        raise ConfigError("--duration, --requests and --items must be positive")
    print_results(bench_serve(args.package, levels, modes, args.duration, args.requests, args.items))
    return 0


def parse_int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text}: expected comma-separated integers, e.g. 1,4,16") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{flag} {text}: expected positive integers, e.g. 1,4,16")
    return values


def bench_serve(package: str | Path, concurrency: Sequence[int] = (1, 4, 16, 64), modes: Sequence[str] = ("on", "off"),
                duration_s: float = 3.0, max_requests: int = 2000, items: int = 1) -> list[dict[str, Any]]:
    """Throughput and latency percentiles per (batching mode, concurrency), one server process per mode.

    The load generator runs in this process and the server in a child, both on this machine's cores:
    compare the rows with each other (batching off is the baseline), not with other machines.
    """
    from deepship.runtime.predictor import Predictor

    modality = Predictor.load(package).modality
    bodies = make_bodies(modality, items, count=64)
    rows = []
    for mode in modes:
        with running_server(package, batching=mode == "on") as (url, pid):
            for level in concurrency:
                result = asyncio.run(load_level(url, bodies, level, duration_s, max_requests))
                rows.append({"kind": "serve", "modality": modality, "batching": mode, "concurrency": level,
                             "items_per_request": items, **result, "server_rss_mib": resident_mib(pid)})
    add_ratios(rows)
    return rows


def make_bodies(modality: str, items: int, count: int, seed: int = 0) -> list[bytes]:
    """`count` distinct JSON request bodies: short sentences, or small noisy PNGs for image models."""
    rng = random.Random(seed)
    if modality == "text":
        words = ("the match was close and the team scored late while rain fell on the new phone app "
                 "recipe with garlic and butter baked for an hour sunny forecast tomorrow").split()
        make = lambda: " ".join(rng.choices(words, k=rng.randint(5, 20)))  # noqa: E731
        return [json.dumps({"inputs": [make() for _ in range(items)]}).encode() for _ in range(count)]
    return [json.dumps({"images": [noise_png_b64(rng) for _ in range(items)]}).encode() for _ in range(count)]


def noise_png_b64(rng: random.Random, size: int = 64) -> str:
    import base64
    import io

    from PIL import Image

    img = Image.frombytes("RGB", (size, size), bytes(rng.getrandbits(8) for _ in range(size * size * 3)))
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def resident_mib(pid: int) -> float | None:
    """The server process's resident memory (Linux /proc; None elsewhere): what one package costs a host."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(package: str | Path, batching: bool, timeout_s: float = 120.0) -> Iterator[tuple[str, int]]:
    """`deepship serve` in a child process on a free loopback port, until it says ready: (url, pid)."""
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "deepship.cli", "serve", "--package", str(package), "--port", str(port),
               "--no-access-log", "--set", f"batching={'true' if batching else 'false'}"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise DeepshipError(f"the server exited with code {process.returncode}: {process.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise DeepshipError(f"the server was not ready after {timeout_s:.0f} s")
            time.sleep(0.2)
        yield url, process.pid
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def load_level(url: str, bodies: list[bytes], concurrency: int, duration_s: float,
                     max_requests: int) -> dict[str, Any]:
    """`concurrency` closed-loop clients, one keep-alive connection each, until `max_requests` or `duration_s`."""
    host, port = url.removeprefix("http://").split(":")
    connections = [await asyncio.open_connection(host, int(port)) for _ in range(concurrency)]
    latencies: list[float] = []
    errors = sent = 0
    try:
        await asyncio.gather(*(post_raw(r, w, bodies[0]) for r, w in connections))  # warm-up, not counted
        before = await batch_stats(url)
        start = time.perf_counter()
        deadline = start + duration_s

        async def client_loop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal sent, errors
            while sent < max_requests and time.perf_counter() < deadline:
                body = bodies[sent % len(bodies)]
                sent += 1
                t0 = time.perf_counter()
                status = await post_raw(reader, writer, body)
                latencies.append(time.perf_counter() - t0)
                errors += status != 200

        await asyncio.gather(*(client_loop(r, w) for r, w in connections))
        elapsed = time.perf_counter() - start
        after = await batch_stats(url)
    finally:
        for _, writer in connections:
            writer.close()
    calls, inputs = after[0] - before[0], after[1] - before[1]
    return {"requests": len(latencies), "errors": errors, "seconds": round(elapsed, 2),
            "throughput_rps": round(len(latencies) / elapsed, 1), "p50_ms": percentile_ms(latencies, 50),
            "p95_ms": percentile_ms(latencies, 95), "p99_ms": percentile_ms(latencies, 99),
            "model_calls": int(calls), "mean_batch": round(inputs / calls, 2) if calls else None}


async def post_raw(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes) -> int:
    """One HTTP/1.1 keep-alive POST /v1/predict; returns the status.

    Hand-rolled on purpose: on a 2-core box the load generator shares the cores with the server, and
    httpx spends several times more CPU per request than this, which would measure the client instead.
    """
    writer.write(b"POST /v1/predict HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(":", 1) for line in lines[1:] if ":" in line)
    await reader.readexactly(int(headers["content-length"]))  # the app always sends Content-Length
    return int(lines[0].split(" ", 2)[1])


async def batch_stats(url: str) -> tuple[float, float]:
    """(model calls, inputs) so far, from the server's own deepship_batch_size histogram."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    async with httpx.AsyncClient(base_url=url, timeout=30.0) as client:
        text = (await client.get("/metrics")).text
    calls = inputs = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == "deepship_batch_size":
            for sample in family.samples:
                calls = sample.value if sample.name.endswith("_count") else calls
                inputs = sample.value if sample.name.endswith("_sum") else inputs
    return calls, inputs


def percentile_ms(values: list[float], q: int) -> float | None:
    if len(values) < 2:
        return round(values[0] * 1000, 2) if values else None
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000, 2)


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Batching-on rows get throughput and p99 ratios against batching off at the same concurrency."""
    off = {r["concurrency"]: r for r in rows if r["batching"] == "off"}
    for row in rows:
        base = off.get(row["concurrency"])
        if row["batching"] == "on" and base and base["throughput_rps"] and base["p99_ms"]:
            row["throughput_vs_off"] = round(row["throughput_rps"] / base["throughput_rps"], 2)
            row["p99_vs_off"] = round(row["p99_ms"] / base["p99_ms"], 2) if row["p99_ms"] else None
