"""Demo datasets generated on first use, so the quickstarts run with no network and no downloads.

`demo:NAME/REST` in a config resolves to `<cache>/NAME-v<version>/REST`, the cache being
`~/.cache/deepship/demo`. Generation is seeded (the same bytes on every machine) and atomic (written to
a temporary folder, then renamed), so concurrent runs are safe.
"""

from __future__ import annotations

import csv
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

DEMO_VERSION = 3  # bump when generated data changes, so caches regenerate

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

# Vocabulary shared by topics, so the quickstart is not trivially separable: subjects that belong to no
# topic, and events that fit two topics equally well (the label of such a row is one of the two).
NEUTRAL_SUBJECTS = ["the local paper", "a neighbour", "the report", "my friend", "the video",
                    "everyone in town", "the headline", "the evening news"]
SHARED_EVENTS: dict[tuple[str, str], list[str]] = {
    ("sports", "weather"): ["broke a record that stood for fifty years",
                            "came in much stronger than anyone predicted"],
    ("sports", "cooking"): ["won the gold medal at the national finals",
                            "took a beating from the judges in the last round"],
    ("sports", "technology"): ["signed a sponsorship deal worth millions",
                               "beat every rival on speed this season"],
    ("weather", "cooking"): ["was far hotter than anyone expected", "needs to cool down slowly overnight"],
    ("weather", "technology"): ["knocked out the power grid for hours", "sent a warning alert to every phone"],
    ("cooking", "technology"): ["went viral after a million views", "ran too hot and had to be switched off"],
}


def _draw(rng: random.Random, combos: list[tuple[str, str, str]], k: int, used: set[str]) -> list[str]:
    """k sentences from (template, subject, event) combos that no earlier draw produced."""
    texts = (t.format(s=s, e=e) for t, s, e in rng.sample(combos, len(combos)))
    fresh = [x for x in texts if x not in used][:k]
    used.update(fresh)
    return fresh


def _topic_rows(rng: random.Random, label: str, n: int, used: set[str], shared_fraction: float,
                crossover_fraction: float, label_noise: float) -> list[tuple[str, str]]:
    """n rows of topic `label`: some with a shared event (truly ambiguous), some with another topic's
    subject (the event decides), the rest plain; `label_noise` of the unambiguous rows get a wrong label."""
    own, others = TOPICS[label], [t for t in TOPICS if t != label]
    shared = [e for pair, events in SHARED_EVENTS.items() if label in pair for e in events]
    foreign = [s for t in others for s in TOPICS[t]["subject"]]
    n_shared, n_cross = round(n * shared_fraction), round(n * crossover_fraction)
    kinds = [(NEUTRAL_SUBJECTS, shared, n_shared), (foreign, own["event"], n_cross),
             (own["subject"] + NEUTRAL_SUBJECTS, own["event"], n - n_shared - n_cross)]
    groups = [_draw(rng, [(t, s, e) for t in TEMPLATES for s in subjects for e in events], k, used)
              for subjects, events, k in kinds]
    clear = groups[1] + groups[2]
    noisy = set(rng.sample(range(len(clear)), round(len(clear) * label_noise)))
    return [(x, label) for x in groups[0]] + [(x, rng.choice(others) if i in noisy else label)
                                              for i, x in enumerate(clear)]


def make_topics_text(root: Path, per_class: tuple[int, int] = (160, 40), seed: int = 0, *,
                     shared_fraction: float = 0.18, crossover_fraction: float = 0.2,
                     label_noise: float = 0.03) -> None:
    """Write train.csv and test.csv (text,label): 4 topics, seeded sentences from the lists above.

    Like real data, the topics overlap (shared subjects and events) and some labels are wrong, so a good
    model lands near 0.9 accuracy and its calibration and thresholds have something to show. No sentence
    appears twice, within or across the splits, so the data report of the demo stays clean."""
    rng = random.Random(seed)
    used: set[str] = set()
    for split, n in zip(("train", "test"), per_class):
        rows = [row for label in TOPICS
                for row in _topic_rows(rng, label, n, used, shared_fraction, crossover_fraction, label_noise)]
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
    """One shape on a random, noisy background. Sizes overlap across classes, the shape may leave the
    frame a little, and a blob sometimes covers part of it."""
    background = np.array([rng.randint(0, 255) for _ in range(3)])
    fill = tuple(int(c + rng.randint(90, 165)) % 256 for c in background)  # always contrasting
    grey = np.random.default_rng(rng.getrandbits(32)).normal(128, rng.uniform(10, 40), (size, size, 1))
    img = Image.fromarray(np.clip(0.75 * background + 0.25 * grey, 0, 255).astype(np.uint8))
    r = rng.uniform(0.18, 0.38) * size
    cx, cy = rng.uniform(0.8 * r, size - 0.8 * r), rng.uniform(0.8 * r, size - 0.8 * r)
    draw = ImageDraw.Draw(img)
    _draw_shape(draw, shape, cx, cy, r, fill)
    if rng.random() < 0.25:  # an occluding blob in a random colour, centred near the shape's edge
        ox, oy, orad = cx + rng.uniform(-r, r), cy + rng.uniform(-r, r), rng.uniform(0.2, 0.4) * r
        draw.ellipse((ox - orad, oy - orad, ox + orad, oy + orad), fill=tuple(rng.randint(0, 255) for _ in range(3)))
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.0)))


def make_shapes_images(root: Path, per_class: tuple[int, int] = (300, 60), seed: int = 0, *,
                       label_noise: float = 0.05) -> None:
    """Write train/ and test/ class-per-folder trees of 64x64 images (PNG and JPEG mixed); in each folder
    `label_noise` of the images show another, random shape."""
    rng = random.Random(seed)
    for split, n in zip(("train", "test"), per_class):
        for shape in SHAPES:
            folder = root / split / shape
            folder.mkdir(parents=True)
            wrong = set(rng.sample(range(n), round(n * label_noise)))
            for i in range(n):
                drawn = rng.choice([s for s in SHAPES if s != shape]) if i in wrong else shape
                render_shape(drawn, rng).save(folder / f"{shape}_{i:04d}.{'png' if i % 2 else 'jpg'}")


DEMOS: dict[str, Callable[[Path], None]] = {
    "topics": make_topics_text,
    "shapes": make_shapes_images,
}


DEMO_CACHE = Path.home() / ".cache" / "deepship" / "demo"


def materialize_demo(name: str, cache: Path | None = None) -> Path:
    """Generate demo `name` once under `cache` (default DEMO_CACHE) and return its folder."""
    target = (cache or DEMO_CACHE) / f"{name}-v{DEMO_VERSION}"
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
