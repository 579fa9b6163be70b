"""`bench serve`: an HTTP load test of a package on loopback, batching on vs off, one server process per mode.

The load generator runs in this process and the server in a child, both on this machine's cores: compare the rows
with each other (batching off is the baseline), not with other machines.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from deepship.bench.common import ratio
from deepship.errors import DeepshipError
from deepship.evaluation.latency import percentiles_ms
from deepship.runtime.modality import Modality


def bench_serve(package: str | Path, concurrency: Sequence[int] = (1, 4, 16, 64), modes: Sequence[str] = ("on", "off"),
                duration_s: float = 3.0, max_requests: int = 2000, items: int = 1) -> list[dict[str, Any]]:
    """Throughput and latency percentiles per (batching mode, concurrency), one server process per mode."""
    from deepship.runtime.predictor import Predictor

    modality = Predictor.load(package).modality
    bodies = make_bodies(modality, items, count=64)
    rows = []
    for mode in modes:
        with running_server(["--package", str(package)], batching=mode == "on") as (url, pid):
            for level in concurrency:
                result = asyncio.run(load_level(url, bodies, level, duration_s, max_requests))
                rows.append({"kind": "serve", "modality": modality.name, "batching": mode, "concurrency": level,
                             "items_per_request": items, **result, "server_rss_mib": resident_mib(pid)})
    add_ratios(rows)
    return rows


def make_bodies(modality: Modality, items: int, count: int, seed: int = 0) -> list[bytes]:
    """`count` distinct JSON request bodies: short sentences, or small noisy PNGs for image models."""
    rng = random.Random(seed)
    make = RANDOM_ITEMS[modality.name]
    return [json.dumps({modality.request_key: [make(rng) for _ in range(items)]}).encode() for _ in range(count)]


def random_sentence(rng: random.Random) -> str:
    words = ("the match was close and the team scored late while rain fell on the new phone app "
             "recipe with garlic and butter baked for an hour sunny forecast tomorrow").split()
    return " ".join(rng.choices(words, k=rng.randint(5, 20)))


def noise_png_b64(rng: random.Random, size: int = 64) -> str:
    import base64
    import io

    from PIL import Image

    img = Image.frombytes("RGB", (size, size), bytes(rng.getrandbits(8) for _ in range(size * size * 3)))
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


RANDOM_ITEMS = {"text": random_sentence, "image": noise_png_b64}  # one request item per modality


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
def running_server(model_args: Sequence[str], batching: bool, timeout_s: float = 120.0) -> Iterator[tuple[str, int]]:
    """`deepship serve MODEL_ARGS` (`--package DIR` or `--model ...`) in a child process on a free loopback port,
    until it says ready: (url, pid)."""
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "deepship.cli", "serve", *model_args, "--port", str(port),
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
                status, _ = await post_raw(reader, writer, body)
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
            "throughput_rps": round(len(latencies) / elapsed, 1),
            **{f"{q}_ms": v for q, v in percentiles_ms(latencies).items()},
            "model_calls": int(calls), "mean_batch": round(inputs / calls, 2) if calls else None}


async def post_raw(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes) -> tuple[int, bytes]:
    """One HTTP/1.1 keep-alive POST /v1/predict; returns the status and the response body.

    Hand-rolled on purpose: on a 2-core box the load generator shares the cores with the server, and
    httpx spends several times more CPU per request than this, which would measure the client instead.
    """
    writer.write(b"POST /v1/predict HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(":", 1) for line in lines[1:] if ":" in line)
    reply = await reader.readexactly(int(headers["content-length"]))  # the app always sends Content-Length
    return int(lines[0].split(" ", 2)[1]), reply


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


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Batching-on rows get throughput and p99 ratios against batching off at the same concurrency."""
    off = {r["concurrency"]: r for r in rows if r["batching"] == "off"}
    for row in rows:
        base = off.get(row["concurrency"])
        if row["batching"] == "on" and base:
            row["throughput_vs_off"] = ratio(row["throughput_rps"], base["throughput_rps"], 2)
            row["p99_vs_off"] = ratio(row["p99_ms"], base["p99_ms"], 2)
