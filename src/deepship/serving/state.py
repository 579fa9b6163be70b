"""The models being served: the current one and the previous one (for rollback), each with its own
micro-batcher, plus readiness and the prediction log.

Reload (SIGHUP or POST /admin/reload) loads and warms the new package first, then swaps one
reference: a request picks its model once, at its start, so it sees the old or the new model, never
a mix. The replaced model stays loaded as `previous` for POST /admin/rollback.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from starlette.concurrency import run_in_threadpool

from deepship.errors import DeepshipError
from deepship.runtime.predictor import Prediction, Predictor
from deepship.serving.batching import MicroBatcher
from deepship.serving.metrics import ServeMetrics
from deepship.serving.modality import ServedModality, served_modality
from deepship.serving.predlog import PredictionLog
from deepship.serving.requests import ParsedInput
from deepship.serving.schemas import ApiError
from deepship.serving.settings import ServeSettings

if TYPE_CHECKING:
    from deepship.serving.alias import RegistryOrigin

logger = logging.getLogger("deepship.serving")


@dataclass
class ModelSlot:
    """A loaded package and its own batcher: one batch never mixes models."""

    predictor: Predictor
    modality: ServedModality
    batcher: MicroBatcher
    package_dir: Path
    origin: RegistryOrigin | None = None  # set when the package was resolved from a model registry
    loaded_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())

    @property
    def version(self) -> str:
        return self.predictor.model_version

    def version_fields(self) -> dict[str, str]:
        """What answers and log records name the model by: the package's version, plus the registry's when there is one."""
        fields = {"model_version": self.version}
        if self.origin is not None:
            fields["registry_version"] = self.origin.tag
        return fields


class ServingState:
    """The current model (and the previous one, for rollback), readiness, metrics and the prediction log."""

    def __init__(self, package_dir: str | Path, settings: ServeSettings, metrics: ServeMetrics) -> None:
        self.package_dir, self.settings, self.metrics = Path(package_dir), settings, metrics
        self.current: ModelSlot | None = None
        self.previous: ModelSlot | None = None
        self.ready = False
        self.predlog: PredictionLog | None = None
        self._swap = asyncio.Lock()  # one reload/rollback at a time

    async def start(self, origin: RegistryOrigin | None = None) -> None:
        if self.settings.log_path:
            self.predlog = PredictionLog(self.settings.log_path, self.settings.log_max_bytes, self.settings.log_backups,
                                         self.settings.log_queue_size, on_drop=self.metrics.log_dropped.inc)
        self.current = await self.load(self.package_dir, origin)
        self.metrics.model_info.labels(self.current.version).set(1)
        self.ready = True

    async def stop(self) -> None:
        """After uvicorn has drained in-flight requests: finish queued batches, flush the log."""
        self.ready = False
        for slot in (self.current, self.previous):
            if slot is not None:
                await slot.batcher.close()
        if self.predlog is not None:
            await run_in_threadpool(self.predlog.close)

    async def load(self, package_dir: Path, origin: RegistryOrigin | None = None) -> ModelSlot:
        # hashes + session take seconds: off the event loop; no spin-waiting threads (see build_session)
        predictor = await run_in_threadpool(Predictor.load, package_dir, spinning=False)
        modality = served_modality(predictor)
        if self.settings.warmup:
            await run_in_threadpool(modality.warm_up, predictor)
        s = self.settings
        batcher = MicroBatcher(modality.batch_call(predictor), s.max_batch_size, s.max_wait_ms, s.batching,
                               on_batch=self.metrics.batch_size.observe)
        await batcher.start()
        return ModelSlot(predictor, modality, batcher, Path(package_dir), origin)

    def serving_slot(self) -> ModelSlot:
        if not self.ready or self.current is None:
            raise ApiError(503, "not_ready", "the model is loading or the server is shutting down; retry shortly")
        return self.current

    async def reload(self, package_dir: str | Path | None = None, origin: RegistryOrigin | None = None) -> dict[str, Any]:
        """Load, warm up, then swap; a package that fails to load leaves the current model serving.

        Without a folder it reloads the current one, keeping its registry origin (the folder is the same version).
        """
        async with self._swap:
            target = Path(package_dir) if package_dir else self.package_dir
            if package_dir is None and self.current is not None:
                origin = self.current.origin
            try:
                slot = await self.load(target, origin)
            except DeepshipError as exc:
                self.metrics.reloads.labels("failed").inc()
                raise ApiError(422, "reload_failed", f"{exc}; still serving {self.version()}") from None
            if self.current is not None and slot.modality.name != self.current.modality.name:
                await slot.batcher.close()
                self.metrics.reloads.labels("failed").inc()
                raise ApiError(422, "reload_failed", f"{target}: a {slot.modality.name} model, but this server "
                                                     f"serves {self.current.modality.name}; start another server")
            evicted = self.previous
            self.previous, self.current = self.current, slot  # the swap: one step on the event loop
            self.package_dir = target  # a later SIGHUP reloads from here
            self.publish_versions()
            self.metrics.reloads.labels("reloaded").inc()
            if evicted is not None and evicted is not self.previous:
                await evicted.batcher.close()  # requests still holding it fall back to unbatched calls
            return self.describe_swap()

    async def rollback(self) -> dict[str, Any]:
        async with self._swap:
            if self.previous is None:
                raise ApiError(409, "no_previous_model", "there is no previous model to roll back to; reload one first")
            self.current, self.previous = self.previous, self.current
            self.package_dir = self.current.package_dir
            self.publish_versions()
            self.metrics.reloads.labels("rolled_back").inc()
            return self.describe_swap()

    async def reload_on_signal(self) -> None:
        try:
            result = await self.reload()
            logger.warning("SIGHUP: now serving %s (previous %s)", result["model_version"], result["previous_version"])
        except ApiError as exc:
            logger.error("SIGHUP: %s", exc.message)

    def publish_versions(self) -> None:
        if self.previous is not None:
            self.metrics.model_info.labels(self.previous.version).set(0)
        if self.current is not None:
            self.metrics.model_info.labels(self.current.version).set(1)

    def version(self) -> str | None:
        return self.current.version if self.current else None

    def describe_swap(self) -> dict[str, Any]:
        return {"model_version": self.version(), "previous_version": self.previous.version if self.previous else None}

    def record(self, slot: ModelSlot, inputs: list[ParsedInput], predictions: list[Prediction], request_id: str,
               latency_ms: float) -> None:
        """Metrics now (cheap); log records to the writer thread."""
        self.metrics.observe_predictions(predictions)
        if self.predlog is None:
            return
        ts = datetime.now(timezone.utc).isoformat()
        records = []
        for index, (item, p) in enumerate(zip(inputs, predictions)):
            record = {"id": f"{request_id}:{index}", "label": p.label, "confidence": p.confidence, "probs": p.probs,
                      "abstained": p.abstained, **slot.version_fields(), "latency_ms": round(latency_ms, 3),
                      "ts": ts, "request_id": request_id, "input_stats": item.stats}
            if item.raw is not None:
                record["input"] = item.raw
            records.append(record)
        self.predlog.write(records)


def install_sighup(state: ServingState) -> Callable[[], None]:
    """SIGHUP -> reload from the package folder. Only the main thread may own signals (not in tests' threads)."""
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(state.reload_on_signal()))
    except (ValueError, RuntimeError, NotImplementedError, AttributeError):
        return lambda: None
    return lambda: loop.remove_signal_handler(signal.SIGHUP)
