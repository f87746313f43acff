"""Writes the bundled sample dataset (images and conversations) next to this file.

    .venv/bin/python finetune/data/sample/make_sample.py

The outputs are committed; rerun only to change them (needs scikit-image, the `test`
extra). The photographs are scikit-image's public-domain sample images, shrunk to small
JPEGs. Their sizes are chosen so that, at scale_resolution 448 (448² = 200,704 pixels),
some are sliced and some are not:

    image                     size      pixels   sliced?
    astronaut.jpg             400x400   160,000  no
    camera.jpg (grayscale)    300x300    90,000  no
    chelsea.jpg               451x300   135,300  no
    coins.jpg (grayscale)     384x303   116,352  no
    page.jpg (grayscale)      384x191    73,344  no
    coffee.jpg                600x400   240,000  yes (2 slices)
    rocket.jpg                640x427   273,280  yes
    tissue.jpg                640x480   307,200  yes
    galaxies.jpg              900x300   270,000  yes (wide)

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
    tissue = _image(data.immunohistochemistry()).crop((0, 64, 512, 448)).resize((640, 480), Image.Resampling.LANCZOS)
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
        "galaxies.jpg": galaxies,
    }


def _turns(*texts: str) -> list[dict]:
    """MiniCPM-V turns from alternating user/assistant texts."""
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)]


def _llava_turns(*texts: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(texts)]


SYSTEM = "You are a concise assistant. Answer in a few words."

TRAIN = [
    {"id": "cat-0", "image": "images/chelsea.jpg", "conversations": _turns("What animal is this?", "A cat.")},
    {"id": "cat-1", "image": "images/chelsea.jpg",
     "conversations": _turns("<image>\nWhat colour are the cat's eyes?", "Green.",
                             "Is the cat asleep?", "No, its eyes are open.")},
    {"id": "astronaut-0", "image": "images/astronaut.jpg",
     "conversations": _turns("Who is in this photo?", "An astronaut in an orange spacesuit.",
                             "Which flag is behind her?", "The flag of the United States.")},
    {"id": "astronaut-1", "image": "images/astronaut.jpg",
     "conversations": [{"role": "system", "content": SYSTEM}]
     + _turns("What is the model on the right?<image>", "A model of the Space Shuttle.")},
    {"id": "coffee-0", "image": "images/coffee.jpg",
     "conversations": _turns("<image>\nWhat is in the cup?", "Coffee.")},
    {"id": "coffee-1", "image": "images/coffee.jpg",
     "conversations": _turns("What colour is the saucer?", "Red.",
                             "What lies on the saucer beside the cup?", "A spoon.")},
    {"id": "rocket-0", "image": "images/rocket.jpg",
     "conversations": _turns("What does this photo show?", "A rocket on its launch pad at dusk.",
                             "How many towers stand around it?", "Four.")},
    {"id": "page-0", "image": "images/page.jpg",
     "conversations": _turns("What is the heading of this page?", "Region-based segmentation.",
                             "Which NumPy function appears in the code line?", "np.zeros_like.")},
    {"id": "camera-0", "image": "images/camera.jpg",
     "conversations": _turns("<image>\nWhat is the man doing?", "Looking through a camera on a tripod.",
                             "Is the photo in colour?", "No, it is black and white.")},
    {"id": "galaxies-0", "image": "images/galaxies.jpg",
     "conversations": _turns("What does this image show?", "Many distant galaxies.")},
    {"id": "tissue-0", "image": "images/tissue.jpg",
     "conversations": _turns("What kind of image is this?", "A microscope image of stained tissue.",
                             "What colour is the stain?", "Brown, with blue nuclei.")},
    {"id": "coins-0", "image": "images/coins.jpg",
     "conversations": _turns("How many coins are there?", "24, in four rows of six.")},
    {"id": "two-images-0",
     "image": {"<image_00>": "images/chelsea.jpg", "<image_01>": "images/astronaut.jpg"},
     "conversations": _turns("<image_00>\n<image_01>\nWhich picture shows a person?", "The second one.")},
    # The second image is named in a later turn, and the dict lists it first: the canonical
    # record orders images by the text, not by the dict.
    {"id": "two-images-1",
     "image": {"<image_01>": "images/rocket.jpg", "<image_00>": "images/coffee.jpg"},
     "conversations": _turns("<image_00>\nWhat is this?", "A cup of coffee.",
                             "And this? <image_01>", "A rocket on its launch pad.")},
    {"id": "text-0", "conversations": _turns("What colour do you get by mixing blue and yellow?", "Green.")},
    {"id": "system-0", "image": "images/galaxies.jpg",
     "conversations": [{"role": "system", "content": SYSTEM}]
     + _turns("Is this a photo of the sea?", "No, of galaxies in deep space.")},
]  # fmt: skip

TRAIN_LLAVA = [
    {"id": "llava-cat-0", "image": "images/chelsea.jpg",
     "conversations": _llava_turns("<image>\nWhat pattern does its fur have?", "Tabby stripes.")},
    {"id": "llava-coffee-0", "image": "images/coffee.jpg",
     "conversations": _llava_turns("What is the table made of?", "Wood.")},
    {"id": "llava-camera-0", "image": "images/camera.jpg",
     "conversations": _llava_turns("<image>\nWhat is the man wearing?", "A dark coat.",
                                   "What stands on the tripod?", "A camera.")},
    {"id": "llava-coins-0", "image": "images/coins.jpg",
     "conversations": _llava_turns("<image>\nAre these coins or stamps?", "Coins.")},
    {"id": "llava-page-0", "image": "images/page.jpg",
     "conversations": [{"from": "system", "value": SYSTEM}]
     + _llava_turns("<image>\nIs this a photo of a person?", "No, it is a page of text.")},
    {"id": "llava-two-images-0", "image": ["images/rocket.jpg", "images/astronaut.jpg"],
     "conversations": _llava_turns("<image>\n<image>\nWhich picture shows a rocket?", "The first one.")},
    {"id": "llava-tissue-0", "image": "images/tissue.jpg",
     "conversations": _llava_turns("<image>\nIs this a landscape photo?", "No, a microscope image of tissue.")},
    {"id": "llava-text-0", "conversations": _llava_turns("How many legs does a cat have?", "Four.")},
]  # fmt: skip

EVAL = [
    {"id": "eval-cat", "image": "images/chelsea.jpg",
     "conversations": _turns("What animal is in the picture?", "A cat.")},
    {"id": "eval-rocket", "image": "images/rocket.jpg", "conversations": _turns("What is this?", "A rocket.")},
    {"id": "eval-camera", "image": "images/camera.jpg",
     "conversations": _turns("What is the man holding?", "A camera on a tripod.")},
    {"id": "eval-coffee", "image": "images/coffee.jpg",
     "conversations": _turns("<image>\nWhat drink is this?", "Coffee.")},
]  # fmt: skip

# One sample per validation rule; each gives exactly one error (listed in tests/test_formats.py).
_OK = _turns("What is this?", "A cat.")
BAD = [
    ["not", "an", "object"],
    {"id": "typo-conversation", "image": "images/chelsea.jpg", "conversation": _OK},
    {"id": "first-turn-assistant", "conversations": [{"role": "assistant", "content": "Hello."}] + _OK},
    {"id": "two-user-turns", "conversations": _turns("Hi.")
     + _turns("What is this?", "A cat.")},
    {"id": "unknown-role", "conversations": _OK[:1] + [{"role": "bot", "content": "A cat."}]},
    {"id": "system-not-first", "conversations": _OK + [{"role": "system", "content": SYSTEM}] + _OK},
    {"id": "content-parts", "image": "images/chelsea.jpg",
     "conversations": [{"role": "user", "content": [{"type": "text", "text": "What is this?"}]}, _OK[1]]},
    {"id": "content-null", "conversations": [_OK[0], {"role": "assistant", "content": None}]},
    {"id": "empty-answer", "conversations": _turns("What is this?", "  ")},
    {"id": "no-answer", "image": "images/chelsea.jpg", "conversations": _turns("What is this?")},
    {"id": "unknown-placeholder", "image": {"<image_00>": "images/chelsea.jpg", "<image_01>": "images/coffee.jpg"},
     "conversations": _turns("<image_00> and <image_03>: what are they?", "A cat and a cup.")},
    {"id": "placeholder-without-image", "conversations": _turns("<image>\nWhat is this?", "A cat.")},
    {"id": "unnamed-image", "image": {"<image_00>": "images/chelsea.jpg", "<image_01>": "images/coffee.jpg"},
     "conversations": _turns("<image_00>\nWhat is this?", "A cat.")},
    {"id": "repeated-placeholder", "image": {"<image_00>": "images/chelsea.jpg"},
     "conversations": _turns("<image_00>\nWhat is this?", "A cat.", "<image_00> again?", "Yes.")},
    {"id": "ambiguous-image", "image": {"<image_00>": "images/chelsea.jpg", "<image_01>": "images/coffee.jpg"},
     "conversations": _turns("<image>\nWhat is this?", "A cat.")},
    {"id": "placeholder-in-answer", "image": "images/chelsea.jpg",
     "conversations": _turns("What is this?", "This: <image>")},
    {"id": "missing-image-file", "image": "images/missing.jpg", "conversations": _OK},
    {"id": ["a", "list"], "conversations": _OK},
    {"id": "llava-too-few-placeholders", "image": ["images/chelsea.jpg", "images/coffee.jpg"],
     "conversations": _llava_turns("<image>\nWhat is this?", "A cat.")},
    {"id": "llava-numbered-placeholder", "image": "images/chelsea.jpg",
     "conversations": _llava_turns("<image_00>\nWhat is this?", "A cat.")},
    {"id": "mixed-formats", "conversations": _OK[:1] + [{"from": "gpt", "value": "A cat."}]},
]  # fmt: skip


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
