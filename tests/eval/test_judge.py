"""dgq.eval.judge: the shipped weights, their accuracy on real data, robustness, and the trainer."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from dgq.eval import judge as judge_mod
from dgq.eval.data import real_images
from tests.tolerances import (
    JUDGE_AFFINE_MIN_AGREEMENT,
    JUDGE_MIN_ACCURACY,
    JUDGE_NOISY_MIN_ACCURACY,
    JUDGE_PROB_SUM_ATOL,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def judge():
    return judge_mod.load_judge()


@pytest.fixture(scope="module")
def real500():
    return real_images(500, "test")


def test_shipped_weights_are_small_and_described_by_their_card():
    assert judge_mod.DEFAULT_WEIGHTS.is_file()
    assert judge_mod.DEFAULT_WEIGHTS.stat().st_size < 1_000_000
    card = judge_mod.load_card()
    assert card.config.num_classes == 10 and len(card.config.class_names) == 10
    assert card.test_accuracy is not None and card.test_accuracy > JUDGE_MIN_ACCURACY
    assert card.train_args["seed"] == 0


def test_judge_accuracy_on_500_real_test_images(judge, real500):
    images, labels = real500
    pred, probs = judge_mod.classify(images, judge)
    assert pred.dtype == torch.int64 and pred.shape == (500,)
    assert probs.shape == (500, 10)
    assert torch.allclose(probs.sum(-1), torch.ones(500), atol=JUDGE_PROB_SUM_ATOL)
    assert float((pred == labels).float().mean()) > JUDGE_MIN_ACCURACY


def test_judge_ignores_affine_intensity_changes_and_survives_grey_backgrounds(judge, real500):
    images, labels = real500
    base, _ = judge_mod.classify(images, judge)
    # A grey background with compressed contrast (the pilot's failure mode) is a positive affine
    # map of intensities, which per-image standardization removes up to round-off.
    grey = 0.3 + 0.6 * images
    pred, _ = judge_mod.classify(grey, judge)
    assert float((pred == base).float().mean()) > JUDGE_AFFINE_MIN_AGREEMENT
    # Mild noise and a one-pixel shift still keep it accurate.
    noisy = (images + 0.1 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    noisy = torch.roll(noisy, shifts=(2, -2), dims=(2, 3))
    pred, _ = judge_mod.classify(noisy, judge)
    assert float((pred == labels).float().mean()) > JUDGE_NOISY_MIN_ACCURACY


def test_classify_accepts_other_sizes_and_gray_input(judge, real500):
    images, _ = real500
    small = torch.nn.functional.interpolate(images[:8], size=(32, 32), mode="area")
    pred_small, _ = judge_mod.classify(small[:, :1], judge)
    pred_full, _ = judge_mod.classify(images[:8], judge)
    assert torch.equal(pred_small, pred_full)  # 64 -> 32 by area is exactly what the judge does itself


def test_bad_input_raises(judge):
    with pytest.raises(ValueError):
        judge_mod.classify(torch.zeros(2, 2, 64, 64), judge)
    with pytest.raises(TypeError):
        judge_mod.classify(torch.zeros(2, 3, 64, 64, dtype=torch.uint8), judge)


def test_save_and_load_round_trip(tmp_path, judge):
    path = tmp_path / "j.safetensors"
    card = judge_mod.JudgeCard(judge.config, test_accuracy=0.5, train_args={"seed": 3})
    judge_mod.save_judge(judge, card, path)
    again = judge_mod.load_judge(path)
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert torch.equal(judge(x), again(x))
    assert json.loads(path.with_suffix(".json").read_text())["train_args"] == {"seed": 3}


def test_a_card_that_does_not_match_the_weights_is_refused(tmp_path, judge):
    path = tmp_path / "j.safetensors"
    judge_mod.save_judge(judge, judge_mod.JudgeCard(judge.config), path)
    card = json.loads(path.with_suffix(".json").read_text())
    card["config"]["stages"] = [[8], [16]]
    path.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises((ValueError, RuntimeError)):
        judge_mod.load_judge(path)
    with pytest.raises(FileNotFoundError, match="train_judge"):
        judge_mod.load_judge(tmp_path / "missing.safetensors")


def test_augment_is_seeded_and_keeps_range():
    x = torch.rand(16, 1, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    a = judge_mod.augment(x, torch.Generator().manual_seed(7))
    b = judge_mod.augment(x, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.shape == (16, 1, 32, 32)
    assert float(a.min()) >= -1.0 and float(a.max()) <= 1.0


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_judge_script_is_seeded_and_writes_a_loadable_judge(tmp_path, capsys):
    script = _load_script("train_judge")
    outs = [tmp_path / "a" / "judge.safetensors", tmp_path / "b" / "judge.safetensors"]
    threads = torch.get_num_threads()
    try:
        for out in outs:
            assert script.main(["--epochs", "1", "--limit", "256", "--test-limit", "200", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)  # the script sets the process-wide thread count
    card = judge_mod.load_card(outs[0])
    assert "test accuracy:" in capsys.readouterr().out
    assert 0.0 <= card.test_accuracy <= 1.0 and card.train_args["limit"] == 256
    a, b = (judge_mod.load_judge(out).state_dict() for out in outs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
