"""Everything serving does differently for texts and images, in one table, and reading a request by it.

The rest of the server is modality-blind: it asks the model's ServedModality which JSON key to read,
how to turn its items (or uploaded files) into inputs, what the micro-batcher calls, and how to warm up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from fastapi import Request
from PIL import Image
from starlette.concurrency import run_in_threadpool

from deepship.runtime.predictor import Prediction, Predictor
from deepship.runtime.preprocess import ImageSpec, TextSpec, preprocess_image
from deepship.runtime.stats import TEXT_SIGNALS
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
class ServedModality:
    name: str
    json_key: str  # the list a JSON body carries: {"inputs": [...]} or {"images": [...]}
    foreign_key: str  # the other modality's key: a body with it was meant for another model
    json_example: str
    parse_items: ParseItems  # the JSON list's strings -> validated inputs
    parse_uploads: ParseUploads | None  # multipart files -> validated inputs; None: JSON only
    inline_json: bool  # small JSON bodies are parsed on the event loop (texts are cheap; images decode)
    batch_call: Callable[[Predictor], BatchCall]
    warm_up: Callable[[Predictor], None]  # one prediction before /readyz: onnxruntime allocates and plans


def text_batch_call(predictor: Predictor) -> BatchCall:
    """One tokenization per text: the batch returns each prediction with the token signals the log carries."""
    def run(texts: Sequence[Any]) -> list[tuple[Prediction, dict[str, Any]]]:
        keep = (*TEXT_SIGNALS, "tokens_truncated")
        return [(p, {k: stats[k] for k in keep}) for p, stats in predictor.predict_with_stats(texts)]

    return run


def image_batch_call(predictor: Predictor) -> BatchCall:
    """Arrays preprocessed in the request thread; their statistics came from that same decode."""
    return lambda arrays: [(p, {}) for p in predictor.predict_arrays(arrays)]


def warm_up_text(predictor: Predictor) -> None:
    predictor.predict(["warm-up"])


def warm_up_image(predictor: Predictor) -> None:
    size = getattr(predictor.spec, "image_size", 224)
    gray = Image.new("RGB", (size, size), (128, 128, 128))
    predictor.predict_arrays([preprocess_image(gray, predictor.spec)])  # the path the batcher runs


MODALITIES = {
    "text": ServedModality("text", "inputs", "images", '{"inputs": ["some text", ...]}',
                           parse_items=lambda items, settings, spec: parse_texts(items, settings), parse_uploads=None,
                           inline_json=True, batch_call=text_batch_call, warm_up=warm_up_text),
    "image": ServedModality("image", "images", "inputs", '{"images": ["<base64 bytes>", ...]}',
                            parse_items=parse_image_items, parse_uploads=parse_images,
                            inline_json=False, batch_call=image_batch_call, warm_up=warm_up_image),
}


def served_modality(predictor: Predictor) -> ServedModality:
    return MODALITIES[predictor.modality]


INLINE_JSON_BYTES = 64 * 1024  # bigger bodies are parsed on a worker thread, not the event loop


def payload_items(payload: dict[str, Any], modality: ServedModality, settings: ServeSettings) -> list[str]:
    """The list under the modality's key ("inputs" or "images"), checked for shape and count."""
    key, example = modality.json_key, modality.json_example
    if modality.foreign_key in payload:
        raise ApiError(400, "wrong_modality", f'this is a {modality.name} model; send {example}, '
                                              f'not "{modality.foreign_key}"')
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
