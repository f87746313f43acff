"""Writes the bundled sample dataset (images and conversations) next to this file.

    .venv/bin/python finetune/data/sample/make_sample.py

The outputs are committed; rerun only to change them (needs scikit-image, the `test`
extra). The photographs are scikit-image's public-domain sample images, shrunk to small
JPEGs. Their sizes are chosen so that, at scale_resolution 448 (448² = 200,704 pixels),
some are sliced and some are not:

    image                     size      pixels   slice grid (cols x rows), max_slice_nums 9
    astronaut.jpg             400x400   160,000  none
    camera.jpg (grayscale)    300x300    90,000  none
    chelsea.jpg               451x300   135,300  none
    coins.jpg (grayscale)     384x303   116,352  none
    page.jpg (grayscale)      384x191    73,344  none
    coffee.jpg                600x400   240,000  2x1
    rocket.jpg                640x427   273,280  2x1
    tissue.jpg                640x480   307,200  2x1
    retina.jpg                400x564   225,600  1x2 (portrait)
    galaxies.jpg              900x300   270,000  3x1 (wide)

Files written:
    images/*.jpg        the photographs
    train.json          MiniCPM-V format: 16 samples (text-only, two images, system turn, multi-turn)
    train_llava.jsonl   LLaVA format: 8 samples
    eval.json           4 held-out samples; the last turn is the reference answer
    bad.json            one broken sample per validation rule (see tests/test_formats.py)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

HERE = Path(__file__).resolve().parent


def _image(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array)


def make_images() -> dict[str, Image.Image]:
    """The photographs, by file name, at their final sizes."""
    astronaut = _image(data.astronaut()).resize((400, 400), Image.Resampling.LANCZOS)
    camera = _image(data.camera()).resize((300, 300), Image.Resampling.LANCZOS)
    tissue = (
        _image(data.immunohistochemistry())
        .crop((0, 64, 512, 448))
        .resize((640, 480), Image.Resampling.LANCZOS)
    )
    retina = _image(data.retina()).crop((206, 0, 1206, 1411)).resize((400, 564), Image.Resampling.LANCZOS)
    hubble = _image(data.hubble_deep_field())  # 1000x872: a 900x300 strip of it
    galaxies = hubble.crop((50, 286, 950, 586))
    return {
        "astronaut.jpg": astronaut,
        "camera.jpg": camera,
        "chelsea.jpg": _image(data.chelsea()),  # 451x300
        "coins.jpg": _image(data.coins()),  # 384x303
        "page.jpg": _image(data.page()),  # 384x191
        "coffee.jpg": _image(data.coffee()),  # 600x400
        "rocket.jpg": _image(data.rocket()),  # 640x427
        "tissue.jpg": tissue,
        "retina.jpg": retina,
        "galaxies.jpg": galaxies,
    }


def minicpmv(sample_id: str, *texts: str, image=None, system: str | None = None) -> dict:
    """A MiniCPM-V sample whose ``texts`` alternate user, assistant."""
    turns = [{"role": "system", "content": system}] if system else []
    turns += [{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(texts)]
    return {"id": sample_id, **({"image": image} if image else {}), "conversations": turns}


def llava(sample_id: str, *texts: str, image=None, system: str | None = None) -> dict:
    """A LLaVA sample whose ``texts`` alternate human, gpt."""
    turns = [{"from": "system", "value": system}] if system else []
    turns += [{"from": ("human", "gpt")[i % 2], "value": text} for i, text in enumerate(texts)]
    return {"id": sample_id, **({"image": image} if image else {}), "conversations": turns}


def img(name: str) -> str:
    return f"images/{name}.jpg"  # relative to the data file


SYSTEM = "You are a concise assistant. Answer in a few words."

TRAIN = [
    minicpmv("cat-0", "What animal is this?", "A cat.", image=img("chelsea")),
    minicpmv(
        "cat-1",
        "<image>\nWhat colour are the cat's eyes?",
        "Green.",
        "Is the cat asleep?",
        "No, its eyes are open.",
        image=img("chelsea"),
    ),
    minicpmv(
        "astronaut-0",
        "Who is in this photo?",
        "An astronaut in an orange spacesuit.",
        "Which flag is behind her?",
        "The flag of the United States.",
        image=img("astronaut"),
    ),
    minicpmv(
        "astronaut-1",
        "What is the model on the right?<image>",
        "A model of the Space Shuttle.",
        image=img("astronaut"),
        system=SYSTEM,
    ),
    minicpmv("coffee-0", "<image>\nWhat is in the cup?", "Coffee.", image=img("coffee")),
    minicpmv(
        "coffee-1",
        "What colour is the saucer?",
        "Red.",
        "What lies on the saucer beside the cup?",
        "A spoon.",
        image=img("coffee"),
    ),
    minicpmv(
        "rocket-0",
        "What does this photo show?",
        "A rocket on its launch pad at dusk.",
        "How many towers stand around it?",
        "Four.",
        image=img("rocket"),
    ),
    minicpmv(
        "page-0",
        "What is the heading of this page?",
        "Region-based segmentation.",
        "Which NumPy function appears in the code line?",
        "np.zeros_like.",
        image=img("page"),
    ),
    minicpmv(
        "camera-0",
        "<image>\nWhat is the man doing?",
        "Looking through a camera on a tripod.",
        "Is the photo in colour?",
        "No, it is black and white.",
        image=img("camera"),
    ),
    minicpmv(
        "retina-0",
        "What part of the body is shown?",
        "The retina, at the back of an eye.",
        image=img("retina"),
    ),
    minicpmv(
        "tissue-0",
        "What kind of image is this?",
        "A microscope image of stained tissue.",
        "What colour is the stain?",
        "Brown, with blue nuclei.",
        image=img("tissue"),
    ),
    minicpmv("coins-0", "How many coins are there?", "24, in four rows of six.", image=img("coins")),
    minicpmv(
        "two-images-0",
        "<image_00>\n<image_01>\nWhich picture shows a person?",
        "The second one.",
        image={"<image_00>": img("chelsea"), "<image_01>": img("astronaut")},
    ),
    # The second image is named in a later turn, and the dict lists it first: the canonical
    # record orders images by the text, not by the dict.
    minicpmv(
        "two-images-1",
        "<image_00>\nWhat is this?",
        "A cup of coffee.",
        "And this? <image_01>",
        "A rocket on its launch pad.",
        image={"<image_01>": img("rocket"), "<image_00>": img("coffee")},
    ),
    minicpmv("text-0", "What colour do you get by mixing blue and yellow?", "Green."),
    minicpmv(
        "system-0",
        "Is this a photo of the sea?",
        "No, of galaxies in deep space.",
        image=img("galaxies"),
        system=SYSTEM,
    ),
]

TRAIN_LLAVA = [
    llava("llava-cat-0", "<image>\nWhat pattern does its fur have?", "Tabby stripes.", image=img("chelsea")),
    llava("llava-coffee-0", "What is the table made of?", "Wood.", image=img("coffee")),
    llava(
        "llava-camera-0",
        "<image>\nWhat is the man wearing?",
        "A dark coat.",
        "What stands on the tripod?",
        "A camera.",
        image=img("camera"),
    ),
    llava("llava-coins-0", "<image>\nAre these coins or stamps?", "Coins.", image=img("coins")),
    llava(
        "llava-page-0",
        "<image>\nIs this a photo of a person?",
        "No, it is a page of text.",
        image=img("page"),
        system=SYSTEM,
    ),
    llava(
        "llava-two-images-0",
        "<image>\n<image>\nWhich picture shows a rocket?",
        "The first one.",
        image=[img("rocket"), img("astronaut")],
    ),
    llava(
        "llava-tissue-0",
        "<image>\nIs this a landscape photo?",
        "No, a microscope image of tissue.",
        image=img("tissue"),
    ),
    llava("llava-text-0", "How many legs does a cat have?", "Four."),
]

EVAL = [
    minicpmv("eval-cat", "What animal is in the picture?", "A cat.", image=img("chelsea")),
    minicpmv("eval-rocket", "What is this?", "A rocket.", image=img("rocket")),
    minicpmv("eval-camera", "What is the man holding?", "A camera on a tripod.", image=img("camera")),
    minicpmv("eval-coffee", "<image>\nWhat drink is this?", "Coffee.", image=img("coffee")),
]


def turn(role: str, content) -> dict:
    return {"role": role, "content": content}


# One sample per validation rule, each giving exactly one error (listed in tests/test_formats.py).
Q, A = "What is this?", "A cat."
QA = [turn("user", Q), turn("assistant", A)]
TWO = {"<image_00>": img("chelsea"), "<image_01>": img("coffee")}
BAD = [
    ["not", "an", "object"],
    {"id": "typo-conversation", "image": img("chelsea"), "conversation": QA},
    {"id": "first-turn-assistant", "conversations": [turn("assistant", "Hi."), *QA]},
    {"id": "two-user-turns", "conversations": [turn("user", "Hi."), *QA]},
    {"id": "unknown-role", "conversations": [turn("user", Q), turn("bot", A)]},
    {"id": "system-not-first", "conversations": [*QA, turn("system", SYSTEM), *QA]},
    {
        "id": "content-parts",
        "image": img("chelsea"),
        "conversations": [turn("user", [{"type": "text", "text": Q}]), turn("assistant", A)],
    },
    {"id": "content-null", "conversations": [turn("user", Q), turn("assistant", None)]},
    minicpmv("empty-answer", Q, "  "),
    minicpmv("no-answer", Q, image=img("chelsea")),
    minicpmv(
        "unknown-placeholder", "<image_00> and <image_03>: what are they?", "A cat and a cup.", image=TWO
    ),
    minicpmv("placeholder-without-image", "<image>\n" + Q, A),
    minicpmv("unnamed-image", "<image_00>\n" + Q, A, image=TWO),
    minicpmv(
        "repeated-placeholder",
        "<image_00>\n" + Q,
        A,
        "<image_00> again?",
        "Yes.",
        image={"<image_00>": img("chelsea")},
    ),
    minicpmv("ambiguous-image", "<image>\n" + Q, A, image=TWO),
    minicpmv("placeholder-in-answer", Q, "This: <image>", image=img("chelsea")),
    minicpmv("missing-image-file", Q, A, image=img("missing")),
    {"id": ["a", "list"], "conversations": QA},
    llava("llava-too-few-placeholders", "<image>\n" + Q, A, image=[img("chelsea"), img("coffee")]),
    llava("llava-numbered-placeholder", "<image_00>\n" + Q, A, image=img("chelsea")),
    {"id": "mixed-formats", "conversations": [turn("user", Q), {"from": "gpt", "value": A}]},
]


def _write_json(name: str, samples: list) -> None:
    (HERE / name).write_text(json.dumps(samples, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def main() -> None:
    (HERE / "images").mkdir(exist_ok=True)
    for name, image in make_images().items():
        image.save(HERE / "images" / name, quality=85, optimize=True)
    _write_json("train.json", TRAIN)
    _write_json("eval.json", EVAL)
    _write_json("bad.json", BAD)
    lines = [json.dumps(sample, ensure_ascii=False) for sample in TRAIN_LLAVA]
    (HERE / "train_llava.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
