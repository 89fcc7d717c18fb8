"""scripts/export_parity.py's judge section: images as the pipelines return them (uint8, H x W x 3)."""

from __future__ import annotations

import numpy as np
import torch

from dgq.eval import judge as judge_mod
from dgq.eval.data import real_images
from scripts.export_parity import judge_flips


def test_judge_flips_reads_pipeline_images_as_the_judge_does():
    images, labels = real_images(60, "test")
    pred, _ = judge_mod.classify(images, judge_mod.load_judge())
    u8 = [np.round((im.permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8) for im in images]
    shifted = u8[1:] + u8[:1]  # every runtime image another test image
    out = judge_flips({"float": u8, "simulator": list(u8), "runtime": shifted}, labels.tolist())
    # the uint8 round trip classifies as the model-format images do (rounding may move one image)
    assert out["judge_accuracy_float"] == out["judge_accuracy_simulator"]
    assert abs(out["judge_accuracy_float"] - float((pred == labels).float().mean())) <= 1 / 60
    assert out["judge_flips_simulator_vs_float"] == 0.0
    expected = float((torch.roll(pred, -1) != pred).float().mean())
    assert abs(out["judge_flips_runtime_vs_float"] - expected) <= 1 / 60
