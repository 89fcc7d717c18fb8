"""What the yardstick evaluates on by default: Fashion-MNIST prompts and real test images."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dgq.zoo.fashion_data import eval_prompts, load_fashion_mnist, to_model_images


def balanced_prompts(prompts: Sequence[tuple[str, int]], count: int | None = None) -> list[tuple[str, int]]:
    """The first ``count`` prompts after interleaving classes (label order, then prompt order), so
    any prefix covers the classes as evenly as possible. ``None``: all of them."""
    by_label: dict[int, list[tuple[str, int]]] = {}
    for prompt, label in prompts:
        by_label.setdefault(label, []).append((prompt, label))
    rounds = max((len(v) for v in by_label.values()), default=0)
    order = [by_label[lab][i] for i in range(rounds) for lab in sorted(by_label) if i < len(by_label[lab])]
    if count is not None and not 1 <= count <= len(order):
        raise ValueError(f"count must be in 1..{len(order)}, got {count}")
    return order[:count]


def default_prompts(count: int | None = None) -> list[tuple[str, int]]:
    """``count`` of the default model's evaluation prompts ``(prompt, label)``, class-balanced."""
    return balanced_prompts(eval_prompts(), count)


def real_images(count: int, split: str = "test", offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Real Fashion-MNIST images ``float32 (count, 3, 64, 64)`` in [-1, 1] (the model's format) and
    labels ``int64 (count,)``: items ``offset .. offset + count - 1`` of ``split``."""
    images, labels = load_fashion_mnist(split)
    if count < 1 or offset < 0 or offset + count > len(images):
        raise ValueError(f"cannot take {count} images from offset {offset} of the {len(images)}-image {split} split")
    return to_model_images(images[offset : offset + count]), torch.from_numpy(labels[offset : offset + count])
