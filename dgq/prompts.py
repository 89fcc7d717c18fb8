"""Calibration prompts: a file, the default model's captions, or a built-in general list.

The paper calibrates on 64 COCO train2017 captions; COCO is not available offline, so the general
list below is 64 short scene descriptions in COCO's style, written for this project.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

GENERAL_PROMPTS = (
    "a man riding a bicycle down a city street",
    "two dogs playing with a frisbee in a park",
    "a plate of pasta with tomatoes and basil",
    "a red double decker bus parked by the curb",
    "a cat sleeping on a laptop keyboard",
    "a group of people flying kites on a beach",
    "a kitchen with white cabinets and a steel refrigerator",
    "a giraffe standing next to a tall tree",
    "a bowl of oranges and bananas on a wooden table",
    "a train crossing a bridge over a river",
    "a young boy holding a baseball bat",
    "a living room with a couch and a television",
    "an airplane taking off from a runway at sunset",
    "a woman holding an umbrella in the rain",
    "a pizza with mushrooms and olives on a tray",
    "a herd of elephants walking across a dry field",
    "a bathroom with a white sink and a mirror",
    "a surfer riding a large wave in the ocean",
    "a clock tower in the middle of a town square",
    "a teddy bear sitting on a wooden chair",
    "a horse grazing in a green meadow",
    "a stop sign at the corner of an empty road",
    "a skier going down a snowy mountain slope",
    "a bedroom with a large bed and striped pillows",
    "a sandwich and a cup of coffee on a plate",
    "a boat docked at a small wooden pier",
    "a zebra drinking water from a pond",
    "a motorcycle parked in front of a brick wall",
    "a child blowing out candles on a birthday cake",
    "a fire hydrant painted yellow on a sidewalk",
    "a vase of sunflowers on a window sill",
    "a sheep standing on a rocky hillside",
    "a man in a suit talking on a phone",
    "a bird perched on a branch covered in snow",
    "a desk with a computer monitor and a lamp",
    "a tennis player swinging a racket on a clay court",
    "a bowl of soup with a spoon beside it",
    "an old truck rusting in a field of grass",
    "a lighthouse on a cliff above the sea",
    "a dog wearing a red scarf in the snow",
    "a row of colorful houses along a canal",
    "a chef preparing food in a restaurant kitchen",
    "a cow lying in the shade of a tree",
    "a person skateboarding down a concrete ramp",
    "a basket of fresh bread on a counter",
    "a mountain lake reflecting pine trees",
    "a woman reading a book on a park bench",
    "a traffic light glowing red at night",
    "a bear walking through a forest",
    "a table set with plates glasses and candles",
    "a little girl feeding ducks at a pond",
    "a busy market with fruit stalls",
    "a laptop and a notebook on a bed",
    "a polar bear swimming in icy water",
    "a bicycle leaning against a blue door",
    "a hot air balloon over a valley",
    "a man fishing from a small boat at dawn",
    "a street filled with cars and yellow taxis",
    "a close up of a slice of chocolate cake",
    "a cat looking out of an open window",
    "a soccer player kicking a ball on a field",
    "a castle on a hill under a cloudy sky",
    "an astronaut riding a horse",
    "a bowl of salad with avocado and eggs",
)


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt per non-empty line; ``#`` starts a comment line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"prompt file {path} has no prompts")
    return prompts


def fashion_prompts(count: int, seed: int = 0) -> list[str]:
    """Captions in the default model's training distribution, classes in turn."""
    from dgq.zoo.fashion_data import CLASS_NAMES, caption

    rng = np.random.default_rng(seed)
    return [caption(i % len(CLASS_NAMES), rng) for i in range(count)]


# Zoo models trained on Fashion-MNIST captions: calibrated with the captions they were trained on.
FASHION_MODELS = ("fashion", "fashion-outliers")


def calibration_prompts(model: str | None, count: int = 64, prompt_file: str | Path | None = None) -> list[str]:
    """``count`` prompts: from ``prompt_file`` when given, the default model's captions for the
    ``fashion`` model, else the built-in general list (repeated if ``count`` exceeds it)."""
    if count < 1:
        raise ValueError(f"need at least one calibration prompt, got {count}")
    if prompt_file is not None:
        prompts = read_prompt_file(prompt_file)
    elif model in FASHION_MODELS:
        return fashion_prompts(count)
    else:
        prompts = list(GENERAL_PROMPTS)
    return [prompts[i % len(prompts)] for i in range(count)]
