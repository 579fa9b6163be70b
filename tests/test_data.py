"""Data layer: both formats per modality, image decoding rules, label maps, splits, padding."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deepship.config import Config, DataConfig
from deepship.data.image import eval_transform, train_transform
from deepship.data.sources import Samples, read_split
from deepship.data.split import build_label_map, encode_labels, load_splits, stratified_split
from deepship.errors import DataError
from deepship.runtime.preprocess import ImageSpec, TextPreprocessor, TextSpec, load_image, preprocess_image

from conftest import toy_image, write_image_folder, write_text_csv


def data_cfg(train: Path | str, **keys) -> DataConfig:
    return DataConfig.model_validate({"train": str(train), **keys})


def read_samples(source: str, task: str, cfg: DataConfig) -> Samples:
    return read_split(cfg.model_copy(update={"train": data_cfg(source).train}).train, task, cfg)


# ----------------------------------------------------------------------------------- images
def test_image_formats_all_decode_to_rgb(tmp_path: Path) -> None:
    base = toy_image(np.random.default_rng(0), "red")
    variants = {"a.jpg": base, "b.png": base, "c.webp": base, "d.png": base.convert("L"),
                "e.png": base.convert("RGBA"), "f.gif": base.convert("P")}
    for name, img in variants.items():
        img.save(tmp_path / name)
    for name in variants:
        img = load_image(tmp_path / name)
        assert img.mode == "RGB" and img.size == (32, 32), name


def test_transparent_pixels_become_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent black
    rgba.save(tmp_path / "t.png")
    assert np.asarray(load_image(tmp_path / "t.png")).min() == 255


def test_exif_orientation_is_respected(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    assert Image.open(tmp_path / "rot.jpg").size == (40, 20)
    assert load_image(tmp_path / "rot.jpg").size == (20, 40)


def test_undecodable_image_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "fake.jpg").write_text("not an image")
    with pytest.raises(DataError, match="fake.jpg: cannot decode image"):
        load_image(tmp_path / "fake.jpg")


def test_image_folder_and_csv_give_the_same_samples(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "imgs", n_per_class=3)
    folder = read_samples(str(root), "image_classification", data_cfg(root))
    rows = ["path,label"] + [f"{Path(p).relative_to(tmp_path).as_posix()},{y}"
                             for p, y in zip(folder.inputs, folder.labels)]
    (tmp_path / "index.csv").write_text("\n".join(rows) + "\n")
    table = read_samples(str(tmp_path / "index.csv"), "image_classification", data_cfg(tmp_path / "index.csv"))
    assert table.inputs == folder.inputs and table.labels == folder.labels
    assert Counter(folder.labels) == {"red": 3, "green": 3, "blue": 3}


def test_eval_transform_is_the_runtime_function_and_train_transform_shapes(tmp_path: Path) -> None:
    spec = ImageSpec.for_size(32)
    img = toy_image(np.random.default_rng(1), "blue", size=50)
    assert torch.equal(eval_transform(spec)(img), torch.from_numpy(preprocess_image(img, spec)))
    out = train_transform(spec)(img)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    # Normalisation puts a mostly-blue image's blue channel well above its red one.
    assert out[2].mean() > out[0].mean()


def test_resize_center_crop_geometry() -> None:
    spec = ImageSpec.for_size(224)
    assert spec.resize_size == 256
    wide = Image.new("RGB", (512, 256), (0, 0, 0))
    wide.paste((255, 255, 255), (0, 0, 128, 256))  # left quarter white: cropped away by the center crop
    arr = preprocess_image(wide, spec)
    assert arr.shape == (3, 224, 224)
    assert np.allclose(arr[0], (0 - spec.mean[0]) / spec.std[0], atol=1e-5)


# ------------------------------------------------------------------------------------- text
def _write_formats(tmp_path: Path) -> dict[str, Path]:
    csv_path = write_text_csv(tmp_path / "t.csv", n_per_class=4)
    import csv as csvlib

    rows = list(csvlib.DictReader(open(csv_path)))
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("".join(json.dumps({"review": r["text"], "y": r["label"]}) + "\n" for r in rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"review": [r["text"] for r in rows], "y": [r["label"] for r in rows]}),
                   tmp_path / "t.parquet")
    return {"csv": csv_path, "jsonl": jsonl, "parquet": tmp_path / "t.parquet"}


def test_text_csv_jsonl_parquet_agree(tmp_path: Path) -> None:
    files = _write_formats(tmp_path)
    csv_samples = read_samples(str(files["csv"]), "text_classification", data_cfg(files["csv"]))
    for fmt in ("jsonl", "parquet"):
        cfg = data_cfg(files[fmt], text_column="review", label_column="y")
        other = read_samples(str(files[fmt]), "text_classification", cfg)
        assert other.inputs == csv_samples.inputs and other.labels == csv_samples.labels, fmt
    assert len(csv_samples) == 8


def test_text_wrong_column_is_named(tmp_path: Path) -> None:
    files = _write_formats(tmp_path)
    with pytest.raises(DataError, match=r"no column 'text'.*data.text_column"):
        read_samples(str(files["jsonl"]), "text_classification", data_cfg(files["jsonl"]))


def test_rows_are_located_for_people(tmp_path: Path) -> None:
    files = _write_formats(tmp_path)
    csv_samples = read_samples(str(files["csv"]), "text_classification", data_cfg(files["csv"]))
    assert csv_samples.origins[0] == f"{files['csv']} row 2"  # the header is row 1
    cfg = data_cfg(files["jsonl"], text_column="review", label_column="y")
    assert read_samples(str(files["jsonl"]), "text_classification", cfg).origins[0] == f"{files['jsonl']} line 1"


def test_text_padding_rounds_up_to_multiple_and_caps(tiny_bert_dir: Path) -> None:
    spec = TextSpec(max_length=40, pad_to_multiple_of=16, input_names=("input_ids", "attention_mask"))
    pre = TextPreprocessor.from_file(tiny_bert_dir / "tokenizer.json", spec)
    short = pre(["hi", "a slightly longer sentence here"])
    assert set(short) == {"input_ids", "attention_mask"}
    assert short["input_ids"].shape == (2, 16) and short["input_ids"].dtype == np.int64
    n_tokens = short["attention_mask"].sum(axis=1)
    assert n_tokens[0] == 3 and n_tokens[1] > n_tokens[0]  # [CLS] hi [SEP]
    assert (short["input_ids"][0, 3:] == spec.pad_id).all()
    long = pre(["word " * 100])
    assert long["input_ids"].shape == (1, 40)  # truncated to max_length, not rounded past it
    assert pre(["word " * 20])["input_ids"].shape == (1, 32)


# ------------------------------------------------------------------------------ labels, split
def test_label_map_sorted_and_unknown_labels_named(tmp_path: Path) -> None:
    assert build_label_map(["b", "a", "c", "a"], "src") == ["a", "b", "c"]
    train = write_text_csv(tmp_path / "train.csv", n_per_class=5)
    val = tmp_path / "val.csv"
    val.write_text("text,label\ngreat film,pos\nodd one,neutral\n")
    cfg = Config.model_validate({"task": "text_classification", "data": {"train": str(train), "val": str(val)}})
    with pytest.raises(DataError, match=r"labels \['neutral'\] do not occur in the training data"):
        load_splits(cfg)


def test_stratified_split_is_stratified_seeded_and_complete() -> None:
    labels = ["a"] * 50 + ["b"] * 30 + ["c"] * 20
    train, val = stratified_split(labels, 0.2, seed=0)
    assert sorted(train + val) == list(range(100)) and not set(train) & set(val)
    assert Counter(labels[i] for i in val) == {"a": 10, "b": 6, "c": 4}
    assert stratified_split(labels, 0.2, seed=0) == (train, val)
    assert stratified_split(labels, 0.2, seed=1)[1] != val


def test_split_keeps_one_val_sample_for_tiny_classes() -> None:
    train, val = stratified_split(["a"] * 20 + ["b"] * 2, 0.1, seed=0)
    assert sum(1 for i in val if i >= 20) == 1 and sum(1 for i in train if i >= 20) == 1


def test_encode_labels_uses_label_map_order(tmp_path: Path) -> None:
    train = write_text_csv(tmp_path / "train.csv", n_per_class=5)
    cfg = Config.model_validate({"task": "text_classification", "data": {"train": str(train), "val_fraction": 0.4}})
    splits = load_splits(cfg)
    assert splits.classes == ["neg", "pos"]
    targets = encode_labels(splits.val, splits.classes, "val")
    assert [splits.classes[t] for t in targets] == splits.val.labels
    assert Counter(splits.val.labels) == {"neg": 2, "pos": 2}


# -------------------------------------------------------------------------------------- demo
def test_demo_datasets_generate_once_and_deterministically(tmp_path: Path) -> None:
    from deepship.data.demo import make_shapes_images, materialize_demo

    first = materialize_demo("topics", cache=tmp_path / "a")
    stamp = (first / "train.csv").stat().st_mtime_ns
    assert materialize_demo("topics", cache=tmp_path / "a") == first  # reused, not rewritten
    assert (first / "train.csv").stat().st_mtime_ns == stamp
    again = materialize_demo("topics", cache=tmp_path / "b")
    assert (again / "train.csv").read_bytes() == (first / "train.csv").read_bytes()
    for name in ("x", "y"):
        make_shapes_images(tmp_path / name, per_class=(3, 1))
    files = sorted(p.relative_to(tmp_path / "x") for p in (tmp_path / "x").rglob("*.*"))
    assert all((tmp_path / "x" / f).read_bytes() == (tmp_path / "y" / f).read_bytes() for f in files)
    images = read_samples(str(tmp_path / "x" / "train"), "image_classification", data_cfg(tmp_path / "x" / "train"))
    assert Counter(images.labels) == {"circle": 3, "square": 3, "triangle": 3, "cross": 3}
    assert len(files) == 4 * 4 and load_image(images.inputs[0]).size == (64, 64)


def test_demo_sources_resolve_to_the_generated_files() -> None:
    text = read_samples("demo:topics/train.csv", "text_classification", data_cfg("demo:topics/train.csv"))
    assert len(text) == 4 * 160 and set(text.labels) == {"sports", "weather", "cooking", "technology"}


def parse_topic_rows(path: Path) -> list[dict]:
    """Each generated row's subject, event and label, recovered from the text by string matching."""
    import csv

    from deepship.data.demo import NEUTRAL_SUBJECTS, SHARED_EVENTS, TOPICS

    subject_topic = {s: t for t, words in TOPICS.items() for s in words["subject"]} | {s: None for s in NEUTRAL_SUBJECTS}
    event_topics = {e: {t} for t, words in TOPICS.items() for e in words["event"]}
    event_topics |= {e: set(pair) for pair, events in SHARED_EVENTS.items() for e in events}
    rows = []
    for row in csv.DictReader(open(path, encoding="utf-8")):
        (s, e), = [(s, e) for s in subject_topic for e in event_topics if f"{s} {e}" in row["text"]]
        rows.append({"text": row["text"], "label": row["label"], "subject": subject_topic[s], "events": event_topics[e]})
    return rows


@pytest.mark.parametrize("settings", [{}, {"shared_fraction": 0.3, "crossover_fraction": 0.0, "label_noise": 0.1}])
def test_topics_overlap_and_label_noise_match_the_settings(tmp_path: Path, settings: dict) -> None:
    from deepship.data.demo import make_topics_text

    expected = {"shared_fraction": 0.18, "crossover_fraction": 0.2, "label_noise": 0.03} | settings
    make_topics_text(tmp_path, **settings)
    rows = parse_topic_rows(tmp_path / "train.csv") + parse_topic_rows(tmp_path / "test.csv")
    assert len(rows) == 4 * (160 + 40) and len({r["text"] for r in rows}) == len(rows)  # no duplicates
    shared = [r for r in rows if len(r["events"]) == 2]
    clear = [r for r in rows if len(r["events"]) == 1]
    crossover = [r for r in clear if r["subject"] not in (None, *r["events"])]
    assert all(r["label"] in r["events"] for r in shared)  # an ambiguous row is labelled one of its topics
    assert len(shared) / len(rows) == pytest.approx(expected["shared_fraction"], abs=0.01)
    assert len(crossover) / len(rows) == pytest.approx(expected["crossover_fraction"], abs=0.01)
    noisy = [r for r in clear if r["label"] not in r["events"]]
    assert len(noisy) / len(clear) == pytest.approx(expected["label_noise"], abs=0.01)


def test_topics_are_learnable_but_not_separable(tmp_path: Path) -> None:
    """A bag-of-words model does well but far from perfectly: the demo has something to calibrate."""
    import pandas as pd
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from deepship.data.demo import make_topics_text

    make_topics_text(tmp_path)
    train, test = pd.read_csv(tmp_path / "train.csv"), pd.read_csv(tmp_path / "test.csv")
    vectorizer = TfidfVectorizer()
    model = LogisticRegression(C=10, max_iter=2000).fit(vectorizer.fit_transform(train.text), train.label)
    accuracy = float(np.mean(model.predict(vectorizer.transform(test.text)) == test.label))
    # chance is 0.25; ambiguous rows (18%, half of them lost) and 3% noise cap a perfect reader near 0.89
    assert 0.7 < accuracy < 0.92, accuracy


def drawn_shape(path: Path) -> tuple[str, float]:
    """The shape a generated PNG shows, recovered independently: mask the most frequent colour (the shape's
    flat fill), then take the shape whose outline over the mask's bounding box overlaps it best (IoU)."""
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3).astype(int)
    colours, counts = np.unique(pixels, axis=0, return_counts=True)
    mask = (np.abs(pixels - colours[counts.argmax()]).max(1) <= 8).reshape(64, 64)
    ys, xs = np.nonzero(mask)
    cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
    r = max(xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()) / 2
    dy, dx = np.mgrid[0:64, 0:64] + 0.5 - np.array([cy, cx])[:, None, None]
    outlines = {"circle": dx**2 + dy**2 <= r**2, "square": (abs(dx) <= r) & (abs(dy) <= r),
                "triangle": (abs(dy) <= r) & (abs(dx) <= (dy + r) / 2),
                "cross": ((abs(dx) <= r) & (abs(dy) <= r / 3)) | ((abs(dx) <= r / 3) & (abs(dy) <= r))}
    iou = {name: (m & mask).sum() / (m | mask).sum() for name, m in outlines.items()}
    best = max(iou, key=iou.get)
    return best, float(iou[best])


@pytest.mark.parametrize("label_noise", [0.05, 0.3])
def test_shapes_label_noise_matches_the_setting(tmp_path: Path, label_noise: float) -> None:
    from deepship.data.demo import make_shapes_images

    make_shapes_images(tmp_path, per_class=(100, 0), label_noise=label_noise)
    seen = [(p.parent.name, *drawn_shape(p)) for p in sorted(tmp_path.glob("train/*/*.png"))]
    clear = [(folder, shape) for folder, shape, iou in seen if iou >= 0.9]  # occluded or cut shapes are left out
    assert len(clear) > 0.6 * len(seen)
    wrong = sum(folder != shape for folder, shape in clear) / len(clear)
    assert wrong == pytest.approx(label_noise, abs=0.04), wrong
