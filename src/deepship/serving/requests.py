"""Request validation: a body becomes validated inputs, or an ApiError that says what to send instead.

Checked at the edge: content type, JSON shape, item count, text length and Unicode, base64, image
size (from the header, before decoding) and decodability. An image is decoded once, here, and its
model array is what the batcher gets. Which of these a request goes through is the ServedModality's choice
(serving/modality.py).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import Request
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from deepship.errors import DataError
from deepship.runtime.preprocess import ImageSpec, load_image, preprocess_image
from deepship.runtime.stats import image_stats
from deepship.serving.schemas import ApiError
from deepship.serving.settings import ServeSettings


@dataclass
class ParsedInput:
    """One validated input: what the predictor gets, summary stats for the log, and the raw form if logged."""

    value: str | np.ndarray  # a text, or an image preprocessed from the decode that validated it
    stats: dict[str, Any]
    raw: str | None = None
    truncated: bool = False


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def parse_json_object(body: bytes, example: str) -> dict[str, Any]:
    if not body.strip():
        raise ApiError(400, "invalid_json", f"request body is empty; send JSON like {example}")
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError; deep nesting recurses
        reason = getattr(exc, "msg", None) or type(exc).__name__
        raise ApiError(400, "invalid_json", f"request body is not valid JSON ({reason}); send JSON like {example}") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "invalid_request", f"expected a JSON object, got {json_type(payload)}; send {example}")
    return payload


def json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return names.get(type(value), "null")


def parse_texts(texts: list[str], settings: ServeSettings) -> list[ParsedInput]:
    out = []
    for index, text in enumerate(texts):
        if not text.strip():
            raise ApiError(400, "empty_input", f"inputs[{index}]: empty text; send at least one non-space character")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # JSON "\ud800" decodes to a lone surrogate the tokenizer cannot take
            raise ApiError(400, "invalid_text", f"inputs[{index}]: not valid Unicode (unpaired surrogate); "
                                                "send UTF-8 text") from None
        value, truncated = text, False
        if len(text) > settings.max_text_chars:
            if settings.text_overflow == "reject":
                raise ApiError(413, "text_too_long", f"inputs[{index}]: {len(text)} characters is over "
                                                     f"max_text_chars={settings.max_text_chars}; shorten the text")
            value, truncated = text[: settings.max_text_chars], True
        stats = {"chars": len(text), "words": len(text.split()), "truncated": truncated}
        out.append(ParsedInput(value, stats, raw=text if settings.log_inputs else None, truncated=truncated))
    return out


def decode_base64(text: str, where: str) -> bytes:
    if text.startswith("data:"):  # data:image/png;base64,....
        text = text.partition(",")[2]
    try:
        data = base64.b64decode("".join(text.split()), validate=True)  # line-wrapped (MIME) base64 is fine
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, "invalid_base64", f"{where}: not valid base64 ({exc}); send the image file's bytes "
                                              "base64-encoded") from None
    if not data:
        raise ApiError(400, "empty_input", f"{where}: empty image; send the image file's bytes base64-encoded")
    return data


def inspect_image(data: bytes, where: str, settings: ServeSettings, spec: ImageSpec
                  ) -> tuple[Image.Image, dict[str, Any]]:
    """Size check from the header (before decoding: no decompression bombs), then a full decode and stats.
    The caller preprocesses this same decoded image for the model: one decode per upload."""
    try:
        with Image.open(io.BytesIO(data)) as header:
            (width, height), fmt = header.size, header.format
    except Exception as exc:  # noqa: BLE001 - any decoder failure on client bytes is the client's bad image
        raise ApiError(400, "invalid_image", f"{where}: not a readable image ({type(exc).__name__}); "
                                             "send a JPEG, PNG, WebP, GIF, BMP or TIFF file") from None
    if width * height > settings.max_image_pixels:
        raise ApiError(413, "image_too_large", f"{where}: {width}x{height} pixels is over max_image_pixels="
                                               f"{settings.max_image_pixels}; downscale the image first")
    # preprocessing resizes the shorter side up or down to spec.resize_size: an extreme aspect ratio (1 x 100000)
    # would blow up there; the same pixel limit applies to the resized image
    scale = spec.resize_size / max(1, min(width, height))
    if round(width * scale) * round(height * scale) > settings.max_image_pixels:
        raise ApiError(413, "image_too_large", f"{where}: {width}x{height} is too elongated (resized for the model it "
                                               f"would exceed max_image_pixels={settings.max_image_pixels}); crop it")
    try:
        img = load_image(data)  # the runtime's own decoder: EXIF orientation, alpha on white, RGB
    except DataError:
        raise ApiError(400, "invalid_image", f"{where}: cannot decode the image (truncated or corrupt); "
                                             "send the complete file") from None
    except Exception as exc:  # noqa: BLE001 - e.g. Pillow's DecompressionBombError, odd plugin errors
        raise ApiError(400, "invalid_image", f"{where}: cannot decode the image ({type(exc).__name__}); "
                                             "send a complete JPEG/PNG file") from None
    # the monitor's image signals, computed as export computed the reference (deepship.runtime.stats)
    return img, {"bytes": len(data), "format": fmt, **image_stats(img)}


def parse_images(sources: list[tuple[str, bytes | str]], settings: ServeSettings, spec: ImageSpec
                 ) -> list[ParsedInput]:
    """(where, base64 text or raw bytes) -> validated, preprocessed inputs: each upload is decoded once, and
    its model array ((3, S, S) float32, small whatever the photo's size) is all a queued request holds. CPU-bound,
    so callers run it off the loop, in parallel across requests."""
    out = []
    for where, source in sources:
        data = decode_base64(source, where) if isinstance(source, str) else source
        if not data:
            raise ApiError(400, "empty_input", f"{where}: empty file; upload the image's bytes")
        img, stats = inspect_image(data, where, settings, spec)
        try:
            array = preprocess_image(img, spec)
        except Exception as exc:  # noqa: BLE001 - a decodable image the resize still refuses is the client's
            raise ApiError(400, "invalid_image", f"{where}: cannot preprocess the image ({type(exc).__name__}); "
                                                 "send an ordinary RGB photo") from None
        raw = base64.b64encode(data).decode("ascii") if settings.log_inputs else None
        out.append(ParsedInput(array, stats, raw=raw))
    return out


def parse_image_items(items: list[str], settings: ServeSettings, spec: ImageSpec) -> list[ParsedInput]:
    """The base64 strings of a JSON body's "images" list."""
    return parse_images([(f"images[{i}]", text) for i, text in enumerate(items)], settings, spec)


async def read_multipart(request: Request, settings: ServeSettings) -> list[tuple[str, bytes]]:
    """Uploaded files in order, as (field[i], bytes); non-file fields are refused."""
    try:
        form = await request.form(max_files=settings.max_items, max_fields=settings.max_items)
    except (MultiPartException, StarletteHTTPException) as exc:
        detail = getattr(exc, "detail", None) or getattr(exc, "message", None) or str(exc)
        if str(detail).startswith("Too many"):
            raise ApiError(413, "too_many_items", f"{detail} (max_items); split the files over several requests") from None
        raise ApiError(400, "invalid_multipart", f"multipart body could not be parsed ({detail}); "
                                                 "upload files as multipart/form-data fields named 'images'") from None
    try:
        files: list[tuple[str, bytes]] = []
        for index, (name, value) in enumerate(form.multi_items()):
            if not isinstance(value, UploadFile):
                raise ApiError(400, "invalid_request", f"form field '{name}' is not a file; upload image files only")
            files.append((f"{name}[{index}]", await value.read()))
    finally:
        await form.close()
    if not files:
        raise ApiError(400, "empty_input", "no files in the multipart body; upload images as fields named 'images'")
    return files
