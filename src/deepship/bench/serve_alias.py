"""`bench serve --alias-moves N`: a server following a registry alias under loopback load while the alias moves.

One server process (`serve --model registry:bench@production`) over a temporary registry that holds the package
N + 1 times (versions 1 .. N + 1: the same files, told apart by the `registry_version` of each answer). Closed-loop
clients post without pause while the alias moves 1 -> 2 -> ... -> N + 1, each move after `settle_s` seconds of
steady load. Per move: seconds from the move to the first answer from the new version, and to the server's
deploy event in the registry; for the run: requests, failed requests (non-200 or a broken connection), latency.
Every move is to a version not loaded yet, so each one pays the full resolve + load + warm-up.
"""

from __future__ import annotations

import asyncio
import re
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from deepship.bench.serve import make_bodies, post_raw, running_server
from deepship.evaluation.latency import percentiles_ms

NAME, ALIAS = "bench", "production"
TAG = re.compile(rb'"registry_version":"([^"]+)"')
MOVE_TIMEOUT_S = 120.0  # a move never answered from the new version is reported as None, not waited on forever


def bench_alias_moves(package: str | Path, moves: int = 3, concurrency: int = 16, settle_s: float = 3.0,
                      watch_interval_s: float = 2.0) -> list[dict[str, Any]]:
    from deepship.registry import open_registry
    from deepship.runtime.predictor import Predictor

    bodies = make_bodies(Predictor.load(package).modality, 1, count=64)
    with tempfile.TemporaryDirectory(prefix="deepship-bench-registry-") as root:
        registry = open_registry(root)
        for _ in range(moves + 1):
            registry.register(package, NAME)
        registry.set_alias(NAME, ALIAS, 1)
        model_args = ["--model", f"registry:{NAME}@{ALIAS}", "--registry", root,
                      "--watch-interval", str(watch_interval_s)]
        with running_server(model_args, batching=True) as (url, _pid):
            load = asyncio.run(load_while_moving(url, bodies, registry, moves, concurrency, settle_s))
        deploys = deploy_timings(registry.events(NAME))
    rows = [{"kind": "serve_alias", "move": k + 1, "to_version": version, "watch_interval_s": watch_interval_s,
             "seconds_to_new_answers": seconds, **deploys.get(version, {})}
            for k, (version, seconds) in enumerate(load.pop("moves"))]
    for row in rows:  # the goal: a move is answered within one poll interval plus the new version's load + warm-up
        load_seconds = row.get("load_seconds")
        row["goal_seconds"] = round(watch_interval_s + load_seconds, 3) if load_seconds is not None else None
    return [*rows, {"kind": "serve_alias", "moves": moves, "concurrency": concurrency, **load}]


async def load_while_moving(url: str, bodies: list[bytes], registry: Any, moves: int, concurrency: int,
                            settle_s: float) -> dict[str, Any]:
    """`concurrency` keep-alive clients posting until the last move has been answered and settled."""
    host, port = url.removeprefix("http://").split(":")
    first_answer: dict[str, float] = {}  # registry version -> when its first answer arrived
    latencies: list[float] = []
    failures = 0
    stop = asyncio.Event()

    async def client(offset: int) -> None:
        nonlocal failures
        reader, writer = await asyncio.open_connection(host, int(port))
        sent = offset
        while not stop.is_set():
            start = time.perf_counter()
            try:
                status, reply = await post_raw(reader, writer, bodies[sent % len(bodies)])
            except (OSError, asyncio.IncompleteReadError):  # a dropped connection is a failed request too
                failures += 1
                writer.close()
                reader, writer = await asyncio.open_connection(host, int(port))
                continue
            now = time.perf_counter()
            latencies.append(now - start)
            sent += concurrency
            failures += status != 200
            tag = TAG.search(reply)
            if tag:
                first_answer.setdefault(tag.group(1).decode(), now)
        writer.close()

    async def mover() -> list[tuple[int, float | None]]:
        timings = []
        await asyncio.sleep(settle_s)
        for version in range(2, moves + 2):
            moved = time.perf_counter()
            await asyncio.to_thread(registry.set_alias, NAME, ALIAS, version)
            tag = f"{NAME}:{version}"
            answered = await wait_for(lambda: tag in first_answer, MOVE_TIMEOUT_S)
            timings.append((version, round(first_answer[tag] - moved, 3) if answered else None))
            await asyncio.sleep(settle_s)
        stop.set()
        return timings

    started = time.perf_counter()
    *_, timings = await asyncio.gather(*(client(i) for i in range(concurrency)), mover())
    elapsed = time.perf_counter() - started
    return {"requests": len(latencies), "failed": failures, "seconds": round(elapsed, 2),
            "throughput_rps": round(len(latencies) / elapsed, 1),
            **{f"{q}_ms": v for q, v in percentiles_ms(latencies).items()},
            "max_ms": round(max(latencies) * 1000, 1) if latencies else None, "moves": timings}


async def wait_for(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.perf_counter() + timeout_s
    while not condition():
        if time.perf_counter() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


def deploy_timings(events: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """Per version, from the registry's own log: seconds from the alias move to the server's deploy event, and
    the server's load + warm-up time within them (the rest is the wait for the next poll)."""
    moved = {e["to"]: e["ts"] for e in events if e["event"] == "alias" and e.get("alias") == ALIAS}
    seconds = lambda a, b: round((datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds(), 3)  # noqa: E731
    return {e["version"]: {"seconds_to_deploy_event": seconds(moved[e["version"]], e["ts"]),
                           "load_seconds": e.get("load_seconds")}
            for e in events if e["event"] == "deploy" and e["version"] in moved}
