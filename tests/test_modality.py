"""deepship.runtime.modality: one object per modality, picked once from the package's preprocessing kind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deepship.errors import PackageError
from deepship.runtime.modality import ImageModality, TextModality, modality_for
from deepship.runtime.predictor import Predictor
from deepship.runtime.preprocess import ImageSpec, TextSpec

from conftest import run_val_samples

TEXTS = ["the movie was great", "awful boring plot", "quite a delightful story " * 10]  # 40 words: past max_length


def test_the_kind_picks_the_object_and_an_unknown_kind_is_a_package_error() -> None:
    text, image = modality_for(TextSpec().to_dict()), modality_for(ImageSpec.for_size(32).to_dict())
    assert isinstance(text, TextModality) and text.name == "text" and text.spec == TextSpec()
    assert isinstance(image, ImageModality) and image.name == "image" and image.spec.image_size == 32
    assert (text.request_key, text.multipart, image.request_key, image.multipart) == ("inputs", False, "images", True)
    assert (text.quantization, image.quantization) == ("dynamic", "static")
    assert (text.dynamic_axes(), image.dynamic_axes()) == ({0: "batch", 1: "sequence"}, {0: "batch"})
    with pytest.raises(PackageError, match="preprocessing.kind 'audio': unknown; expected one of \\['image', 'text'\\]"):
        modality_for({"kind": "audio"})


def test_text_batches_predict_as_raw_texts_with_the_signals_the_monitor_reads(text_package: Path) -> None:
    predictor = Predictor.load(text_package)
    assert predictor.modality.name == "text" and predictor.modality.collates_arrays is False
    batch = predictor.predict_batch(TEXTS)
    assert [p for p, _ in batch] == predictor.predict(TEXTS)
    stats = [s for _, s in batch]
    assert stats == predictor.input_stats(TEXTS)
    assert all(set(predictor.modality.signals) <= set(s) for s in stats)
    # tokens exclude [CLS]/[SEP] and are capped by max_length (32 in the tiny run) minus those two
    assert [s["tokens"] for s in stats[:2]] == [4, 3] and stats[2]["tokens"] == 30
    assert predictor.predict_batch([predictor.modality.warmup_input()])[0][0].label in ("neg", "pos")


def test_image_batches_predict_preprocessed_arrays_as_the_files_would(image_package: Path, tiny_image_run: Path) -> None:
    from deepship.runtime.preprocess import load_image, preprocess_image

    predictor = Predictor.load(image_package)
    files = run_val_samples(tiny_image_run).inputs[:3]
    assert predictor.modality.name == "image" and predictor.modality.collates_arrays is True
    arrays = [preprocess_image(load_image(f), predictor.spec) for f in files]
    batch = predictor.predict_batch(arrays)
    expected = predictor.predict(files)
    assert [p.label for p, _ in batch] == [p.label for p in expected]
    np.testing.assert_allclose([p.confidence for p, _ in batch], [p.confidence for p in expected], atol=1e-6)
    assert [s for _, s in batch] == [None] * 3  # image statistics are computed where the upload is decoded
    stats = predictor.input_stats(files)
    assert all(set(predictor.modality.signals) <= set(s) for s in stats)
    assert (stats[0]["width"], stats[0]["height"]) == (32, 32)  # the toy images are 32 x 32
    assert predictor.modality.warmup_input().shape == (3, 32, 32)
