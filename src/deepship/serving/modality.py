"""Reading a request the way the model's modality needs it.

The runtime's modality object says which JSON key holds the inputs, whether uploads are accepted, how a
batch is collated and what warms the model up; the one thing only serving knows, how a request's items
are validated, is the PARSING table. The rest of the server is modality-blind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from deepship.runtime.modality import MODALITIES as RUNTIME_MODALITIES
from deepship.runtime.modality import Modality
from deepship.runtime.predictor import Prediction, Predictor
from deepship.runtime.preprocess import ImageSpec, TextSpec
from deepship.serving.requests import (
    ParsedInput,
    json_type,
    media_type,
    parse_image_items,
    parse_images,
    parse_json_object,
    parse_texts,
    read_multipart,
)
from deepship.serving.schemas import ApiError
from deepship.serving.settings import ServeSettings

# One model call over a batch of inputs: each prediction with the input statistics the log adds to the ones
# request parsing computed (a text's token signals come out of the model call's own tokenization).
BatchCall = Callable[[Sequence[Any]], list[tuple[Prediction, dict[str, Any]]]]
ParseItems = Callable[[list[str], ServeSettings, Any], list[ParsedInput]]
ParseUploads = Callable[[list[tuple[str, bytes]], ServeSettings, Any], list[ParsedInput]]


@dataclass(frozen=True)
class RequestParsing:
    """How a request's items become validated inputs: the part of serving that only serving knows."""

    json_example: str
    parse_items: ParseItems  # the JSON list's strings -> validated inputs
    parse_uploads: ParseUploads | None  # multipart files -> validated inputs; None: JSON only
    inline_json: bool  # small JSON bodies are parsed on the event loop (texts are cheap; images decode)


PARSING = {
    "text": RequestParsing('{"inputs": ["some text", ...]}', lambda items, settings, spec: parse_texts(items, settings),
                           parse_uploads=None, inline_json=True),
    "image": RequestParsing('{"images": ["<base64 bytes>", ...]}', parse_image_items, parse_uploads=parse_images,
                            inline_json=False),
}
REQUEST_KEYS = frozenset(cls.request_key for cls in RUNTIME_MODALITIES.values())


@dataclass(frozen=True)
class ServedModality:
    """The runtime's modality object (JSON key, multipart, warm-up input, batch collation) plus request parsing."""

    runtime: Modality
    parsing: RequestParsing

    @property
    def name(self) -> str:
        return self.runtime.name

    @property
    def json_key(self) -> str:  # the list a JSON body carries: {"inputs": [...]} or {"images": [...]}
        return self.runtime.request_key

    @property
    def foreign_keys(self) -> list[str]:  # other models' keys: a body with one was meant for another model
        return sorted(REQUEST_KEYS - {self.json_key})

    @property
    def json_example(self) -> str:
        return self.parsing.json_example

    @property
    def inline_json(self) -> bool:
        return self.parsing.inline_json

    @property
    def parse_uploads(self) -> ParseUploads | None:
        return self.parsing.parse_uploads if self.runtime.multipart else None

    def parse_items(self, items: list[str], settings: ServeSettings, spec: Any) -> list[ParsedInput]:
        return self.parsing.parse_items(items, settings, spec)

    def batch_call(self, predictor: Predictor) -> BatchCall:
        """One model call per batch; the statistics it computed (a text's tokens) join the log record."""
        keep = (*self.runtime.signals, "tokens_truncated")

        def run(items: Sequence[Any]) -> list[tuple[Prediction, dict[str, Any]]]:
            return [(p, {} if stats is None else {k: stats[k] for k in keep if k in stats})
                    for p, stats in predictor.predict_batch(items)]

        return run

    def warm_up(self, predictor: Predictor) -> None:
        """One prediction through the batcher's path before /readyz: onnxruntime allocates and plans."""
        predictor.predict_batch([self.runtime.warmup_input()])


def served_modality(predictor: Predictor) -> ServedModality:
    return ServedModality(predictor.modality, PARSING[predictor.modality.name])


INLINE_JSON_BYTES = 64 * 1024  # bigger bodies are parsed on a worker thread, not the event loop


def payload_items(payload: dict[str, Any], modality: ServedModality, settings: ServeSettings) -> list[str]:
    """The list under the modality's key ("inputs" or "images"), checked for shape and count."""
    key, example = modality.json_key, modality.json_example
    foreign = [k for k in modality.foreign_keys if k in payload]
    if foreign:
        raise ApiError(400, "wrong_modality", f'this is a {modality.name} model; send {example}, '
                                              f'not "{foreign[0]}"')
    unknown = sorted(set(payload) - {key})
    if unknown:
        raise ApiError(400, "invalid_request", f"unknown key(s) {unknown}; send {example}")
    items = payload.get(key)
    if not isinstance(items, list):
        got = "nothing" if key not in payload else json_type(items)
        raise ApiError(400, "invalid_request", f'"{key}" must be a list of strings, got {got}; send {example}')
    if not items:
        raise ApiError(400, "empty_input", f'"{key}" is empty; send at least one item')
    if len(items) > settings.max_items:
        raise ApiError(413, "too_many_items", f'{len(items)} items in "{key}" is over max_items={settings.max_items}; '
                                              "split them over several requests")
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise ApiError(400, "invalid_request", f"{key}[{index}]: expected a string, got {json_type(item)}")
    return items


def parse_json_body(body: bytes, modality: ServedModality, settings: ServeSettings,
                    spec: ImageSpec | TextSpec) -> list[ParsedInput]:
    items = payload_items(parse_json_object(body, modality.json_example), modality, settings)
    return modality.parse_items(items, settings, spec)


async def read_inputs(request: Request, modality: ServedModality, settings: ServeSettings,
                      spec: ImageSpec | TextSpec) -> list[ParsedInput]:
    kind = media_type(request)
    if kind == "application/json" or kind.endswith("+json"):
        body = await request.body()
        if modality.inline_json and len(body) <= INLINE_JSON_BYTES:
            return parse_json_body(body, modality, settings, spec)  # a thread hop would cost more than the parse
        return await run_in_threadpool(parse_json_body, body, modality, settings, spec)
    if kind == "multipart/form-data":
        if modality.parse_uploads is None:
            raise ApiError(415, "unsupported_media_type", f"a {modality.name} model takes application/json "
                                                          f"{modality.json_example}")
        files = await read_multipart(request, settings)
        return await run_in_threadpool(modality.parse_uploads, files, settings, spec)
    accepted = "application/json" + (" or multipart/form-data" if modality.parse_uploads is not None else "")
    raise ApiError(415, "unsupported_media_type", f"Content-Type '{kind or 'none'}' is not supported; send {accepted} "
                                                  f"like {modality.json_example}")
