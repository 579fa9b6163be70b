"""Demo datasets generated on first use, so the quickstarts run with no network and no downloads.

`demo:NAME/REST` in a config resolves to `<cache>/NAME-v<version>/REST`. The cache is
`$DEEPSHIP_DEMO_DIR` or `~/.cache/deepship/demo`. Generation is seeded (the same bytes on every
machine) and atomic (written to a temporary folder, then renamed), so concurrent runs are safe.
"""

from __future__ import annotations

import csv
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from PIL import Image, ImageDraw, ImageFilter

DEMO_VERSION = 2  # bump when generated data changes, so caches regenerate

# ------------------------------------------------------------------------------------ text topics
# Hand-written vocabulary: each class has its own subjects and events; shared templates and filler
# words mean a model has to pick up the topic words, not the sentence shape.
TOPICS: dict[str, dict[str, list[str]]] = {
    "sports": {
        "subject": ["the striker", "our goalkeeper", "the home team", "the coach", "the referee",
                    "the sprinter", "the rookie guard", "the captain", "the visiting side", "the pitcher"],
        "event": ["scored twice in the second half", "missed a penalty in extra time",
                  "won the championship final", "was sent off after a rough tackle",
                  "broke the national record in the relay", "signed a new contract with the club",
                  "hit a home run in the ninth inning", "trained hard before the derby",
                  "celebrated a narrow win at the stadium", "lost the match on penalties"],
    },
    "weather": {
        "subject": ["the forecast", "the storm front", "a cold wind", "heavy rain", "the heatwave",
                    "morning fog", "the snowfall", "a thunderstorm", "the humidity", "the hurricane"],
        "event": ["brought flooding to the valley", "kept temperatures below freezing",
                  "is expected to clear by the weekend", "delayed flights with low visibility",
                  "pushed the thermometer past forty degrees", "left a thick layer of snow on the roads",
                  "knocked out power with strong gusts", "made the air sticky all afternoon",
                  "turned the sky dark with lightning", "moved slowly up the coast"],
    },
    "cooking": {
        "subject": ["the chef", "my grandmother", "the baker", "our recipe", "the sauce",
                    "the sourdough", "the soup", "the pastry cook", "the grill master", "the risotto"],
        "event": ["simmered the onions in butter", "needs a pinch of salt and fresh basil",
                  "roasted the vegetables until golden", "kneaded the dough for ten minutes",
                  "whisked the eggs with sugar and vanilla", "seared the steak on a hot pan",
                  "let the stew cook slowly over low heat", "folded the cream into the batter",
                  "baked the bread in a stone oven", "served the pasta with grated cheese"],
    },
    "technology": {
        "subject": ["the new phone", "the software update", "the startup", "our laptop",
                    "the cloud service", "the chip maker", "the database", "the app",
                    "the open source project", "the graphics card"],
        "event": ["shipped a faster processor", "fixed a security bug in the kernel",
                  "crashed after the latest patch", "doubled the battery life",
                  "released an api for developers", "moved its servers to a new data center",
                  "compiles the code twice as fast", "added encryption to every message",
                  "runs the neural network on the gpu", "lost connection to the wireless network"],
    },
}
TEMPLATES = ["{s} {e}.", "yesterday {s} {e}.", "people said {s} {e}.", "i read that {s} {e}.",
             "{s} {e} again.", "everyone noticed that {s} {e}.", "{s} {e}, as expected.",
             "this week {s} {e}."]


def make_topics_text(root: Path, per_class: tuple[int, int] = (160, 40), seed: int = 0) -> None:
    """Write train.csv and test.csv (text,label): 4 topics, seeded sentences from the lists above.

    Each sentence is a distinct (template, subject, event) combination, so there are no duplicates
    within or across the splits: the data report of the demo stays clean."""
    rng = random.Random(seed)
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    for label, words in TOPICS.items():
        combos = [(t, s, e) for t in TEMPLATES for s in words["subject"] for e in words["event"]]
        chosen = rng.sample(combos, sum(per_class))
        texts = [t.format(s=s, e=e) for t, s, e in chosen]
        splits["train"] += [(x, label) for x in texts[: per_class[0]]]
        splits["test"] += [(x, label) for x in texts[per_class[0] :]]
    for split, rows in splits.items():
        rng.shuffle(rows)
        with open(root / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(rows)


# ----------------------------------------------------------------------------------- image shapes
SHAPES = ("circle", "square", "triangle", "cross")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:  # cross
        w = r / 3
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)


def render_shape(shape: str, rng: random.Random, size: int = 64) -> Image.Image:
    """One shape in a random colour, size and place on a random, slightly noisy background."""
    background = tuple(rng.randint(0, 255) for _ in range(3))
    fill = tuple((c + rng.randint(90, 165)) % 256 for c in background)  # always contrasting
    img = Image.effect_noise((size, size), rng.uniform(10, 40)).convert("RGB")
    img = Image.blend(Image.new("RGB", (size, size), background), img, 0.25)
    r = rng.uniform(0.22, 0.38) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    _draw_shape(ImageDraw.Draw(img), shape, cx, cy, r, fill)
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.8)))


def make_shapes_images(root: Path, per_class: tuple[int, int] = (300, 60), seed: int = 0) -> None:
    """Write train/ and test/ class-per-folder trees of 64x64 images (PNG and JPEG mixed)."""
    rng = random.Random(seed)
    for split, n in zip(("train", "test"), per_class):
        for shape in SHAPES:
            folder = root / split / shape
            folder.mkdir(parents=True)
            for i in range(n):
                ext = "png" if i % 2 else "jpg"
                render_shape(shape, rng).save(folder / f"{shape}_{i:04d}.{ext}")


DEMOS: dict[str, Callable[[Path], None]] = {
    "topics": make_topics_text,
    "shapes": make_shapes_images,
}


def demo_cache_dir() -> Path:
    return Path(os.environ.get("DEEPSHIP_DEMO_DIR", Path.home() / ".cache" / "deepship" / "demo"))


def materialize_demo(name: str) -> Path:
    """Generate demo `name` once and return its folder."""
    target = demo_cache_dir() / f"{name}-v{DEMO_VERSION}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        DEMOS[name](tmp)
        os.replace(tmp, target)
    except OSError:
        if not target.is_dir():  # a concurrent run may have won the rename; otherwise a real error
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
