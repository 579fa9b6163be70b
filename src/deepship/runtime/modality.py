"""What differs between image and text models downstream of training, in one object per modality.

`modality_for(spec)` picks it once from the package's `preprocessing.kind`; the predictor, export,
evaluate, monitor and serving ask it instead of branching on the modality themselves. Torch-free.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

import numpy as np
from PIL import Image

from deepship.errors import DataError, PackageError
from deepship.runtime.inputs import TABLE_FORMATS, accepted, image_files, table_inputs, text_lines
from deepship.runtime.preprocess import (
    IMAGE_EXTENSIONS,
    IMAGE_INPUT,
    ImageSpec,
    TextPreprocessor,
    TextSpec,
    load_image,
    preprocess_image,
    preprocess_images,
)
from deepship.runtime.stats import IMAGE_SIGNALS, TEXT_SIGNALS, image_stats, text_stats

Arrays = dict[str, np.ndarray]
Stats = list[dict[str, Any]]


class Modality(ABC):
    """One modality's preprocessing, input statistics, input files, serving contract and export choices."""

    name: ClassVar[str]  # "text" | "image", as in the package's preprocessing.kind
    signals: ClassVar[tuple[str, ...]]  # numeric input statistics a record carries; the monitor's signals
    request_key: ClassVar[str]  # serving: the JSON key that holds a request's inputs
    multipart: ClassVar[bool]  # serving: whether multipart/form-data uploads are accepted
    # serving: True when request threads preprocess each input to its array and the batcher stacks
    # arrays (`collate`); False when the batcher gets raw inputs and prepares them with their stats
    collates_arrays: ClassVar[bool]
    quantization: ClassVar[str]  # int8 method: "dynamic" (per batch scales) or "static" (calibrated)
    assets: ClassVar[tuple[str, ...]]  # run-folder entries a package ships beside model.onnx

    spec_type: ClassVar[type[ImageSpec] | type[TextSpec]]
    spec: ImageSpec | TextSpec

    def __str__(self) -> str:
        return self.name

    @abstractmethod
    def dynamic_axes(self) -> dict[int, str]:
        """The ONNX inputs' dynamic axes."""

    @abstractmethod
    def preprocess(self, inputs: Sequence[Any]) -> Arrays:
        """Raw inputs -> model arrays, named as the model's inputs."""

    @abstractmethod
    def prepare(self, inputs: Sequence[Any]) -> tuple[Arrays, Stats]:
        """Model arrays and input statistics from ONE tokenization or decode per input."""

    @abstractmethod
    def input_stats(self, inputs: Sequence[Any]) -> Stats:
        """Input statistics (deepship.runtime.stats) without running the model."""

    @abstractmethod
    def read_inputs(self, path: Path, column: str | None = None) -> Iterator[tuple[str, str]]:
        """(id, input) pairs from a file or folder, streamed; unknown formats are a DataError."""

    @abstractmethod
    def usable(self, raw: str) -> bool:
        """Whether a raw input read from a table can be predicted at all (not empty, file present)."""

    @abstractmethod
    def warmup_input(self) -> Any:
        """One input in the form `collate` takes, to run the model once before serving."""

    @abstractmethod
    def collate(self, items: Sequence[Any]) -> tuple[Arrays, list[dict[str, Any] | None]]:
        """Serving batch -> model arrays and each input's statistics (None where request threads keep them)."""

    def parity_inputs(self, val_inputs: Sequence[str]) -> list[tuple[str, list[str]]]:
        """Extra (name, raw inputs) cases the export parity gate runs beyond plain validation batches."""
        return []


class TextModality(Modality):
    name = "text"
    signals = TEXT_SIGNALS
    request_key = "inputs"
    multipart = False
    collates_arrays = False
    quantization = "dynamic"  # transformer MatMuls; activation ranges vary per input
    assets = ("tokenizer",)
    spec_type = TextSpec

    def __init__(self, spec: TextSpec, package_dir: Path | None = None) -> None:
        self.spec = spec
        self._preprocessor = (TextPreprocessor.from_file(package_dir / spec.tokenizer_file, spec)
                              if package_dir is not None else None)

    @property
    def preprocessor(self) -> TextPreprocessor:
        if self._preprocessor is None:
            raise PackageError("text preprocessing needs the package's tokenizer; build the modality with package_dir")
        return self._preprocessor

    def dynamic_axes(self) -> dict[int, str]:
        return {0: "batch", 1: "sequence"}

    def preprocess(self, inputs: Sequence[Any]) -> Arrays:
        return self.preprocessor([str(t) for t in inputs])

    def prepare(self, inputs: Sequence[Any]) -> tuple[Arrays, Stats]:
        texts = [str(t) for t in inputs]
        encodings = self.preprocessor.tokenize(texts)
        return self.preprocessor.pad(encodings), text_stats(self.preprocessor, texts, encodings)

    def input_stats(self, inputs: Sequence[Any]) -> Stats:
        return text_stats(self.preprocessor, [str(t) for t in inputs])

    def read_inputs(self, path: Path, column: str | None = None) -> Iterator[tuple[str, str]]:
        if path.is_dir():
            raise DataError(f"{path}: is a folder; a text model reads {accepted(TEXT_FILES)}")
        if path.suffix.lower() == ".txt":
            return text_lines(path)
        if path.suffix.lower() not in TABLE_FORMATS:
            raise DataError(f"{path}: unsupported file type '{path.suffix}'; a text model reads {accepted(TEXT_FILES)}")
        return ((item_id, "" if value is None else str(value)) for item_id, value in table_inputs(path, column or "text"))

    def usable(self, raw: str) -> bool:
        return bool(raw)

    def warmup_input(self) -> str:
        return "warm-up"

    def collate(self, items: Sequence[Any]) -> tuple[Arrays, list[dict[str, Any] | None]]:
        arrays, stats = self.prepare(items)
        return arrays, list(stats)

    def parity_inputs(self, val_inputs: Sequence[str]) -> list[tuple[str, list[str]]]:
        """Very short texts, and texts past max_length (truncation) padded beside a short one (a real
        attention mask at the longest shape)."""
        texts = [str(val_inputs[i % len(val_inputs)]) for i in range(7)]
        short = [t.split()[0] if t.split() else "a" for t in texts]
        long = [" ".join([t] * self.spec.max_length) for t in texts[:6]] + [short[0]]
        return [("short_texts", short), ("max_length", long)]


class ImageModality(Modality):
    name = "image"
    signals = IMAGE_SIGNALS
    request_key = "images"
    multipart = True
    collates_arrays = True
    quantization = "static"  # convolutions need fixed activation scales to run as int8 kernels
    assets = ()
    spec_type = ImageSpec

    def __init__(self, spec: ImageSpec, package_dir: Path | None = None) -> None:
        self.spec = spec

    def dynamic_axes(self) -> dict[int, str]:
        return {0: "batch"}

    def preprocess(self, inputs: Sequence[Any]) -> Arrays:
        return preprocess_images(inputs, self.spec)

    def prepare(self, inputs: Sequence[Any]) -> tuple[Arrays, Stats]:
        images = [load_image(x) for x in inputs]
        return {IMAGE_INPUT: np.stack([preprocess_image(img, self.spec) for img in images])}, \
            [image_stats(img) for img in images]

    def input_stats(self, inputs: Sequence[Any]) -> Stats:
        return [image_stats(load_image(x)) for x in inputs]

    def read_inputs(self, path: Path, column: str | None = None) -> Iterator[tuple[str, str]]:
        """A folder (recursively), one image file, or a table whose path column is relative to it."""
        if path.is_dir():
            return ((str(p.relative_to(path)), str(p)) for p in image_files(path))
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            return iter([(path.name, str(path))])
        if path.suffix.lower() not in TABLE_FORMATS:
            raise DataError(f"{path}: unsupported file type '{path.suffix}'; an image model reads {IMAGE_FILES}")
        base = path.resolve().parent
        return ((item_id, str(base / str(value))) for item_id, value in table_inputs(path, column or "path", id_is_input=True))

    def usable(self, raw: str) -> bool:
        return bool(raw) and Path(raw).is_file()

    def warmup_input(self) -> np.ndarray:
        size = self.spec.image_size
        return preprocess_image(Image.new("RGB", (size, size), (128, 128, 128)), self.spec)

    def collate(self, items: Sequence[Any]) -> tuple[Arrays, list[dict[str, Any] | None]]:
        return {IMAGE_INPUT: np.stack(items)}, [None] * len(items)


TEXT_FILES = (*TABLE_FORMATS, ".txt")
IMAGE_FILES = "an image file, a folder of images, or a table of paths (" + ", ".join(TABLE_FORMATS) + ")"
MODALITIES: dict[str, type[Modality]] = {"text": TextModality, "image": ImageModality}


def modality_for(spec: dict[str, Any], package_dir: Path | None = None) -> Modality:
    """The modality of a preprocessing spec (`ImageSpec/TextSpec.to_dict()`, a package's `preprocessing`);
    text preprocessing loads the tokenizer from `package_dir` (without it: everything but preprocessing)."""
    kind = spec.get("kind")
    if kind not in MODALITIES:
        raise PackageError(f"preprocessing.kind {kind!r}: unknown; expected one of {sorted(MODALITIES)}")
    cls = MODALITIES[kind]
    return cls(cls.spec_type.from_dict(spec), package_dir)
