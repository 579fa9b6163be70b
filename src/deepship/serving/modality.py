"""Everything serving does differently for texts and images, in one table.

The rest of the server is modality-blind: it asks the model's ServedModality which JSON key to read,
how to turn its items (or uploaded files) into inputs, what the micro-batcher calls, and how to warm up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from PIL import Image

from deepship.runtime.predictor import Prediction, Predictor
from deepship.runtime.preprocess import preprocess_image
from deepship.runtime.stats import TEXT_SIGNALS
from deepship.serving.requests import ParsedInput, parse_image_items, parse_images, parse_texts
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
