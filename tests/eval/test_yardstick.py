"""dgq.eval.yardstick on the tiny pipeline: itself (known answers), a perturbed copy, determinism."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from dgq import zoo
from dgq.eval import cli as eval_cli
from dgq.eval.capture import record_unet_calls, replay
from dgq.eval.data import balanced_prompts, default_prompts
from dgq.eval.yardstick import YardstickConfig, evaluate, format_table, write_report
from tests.tolerances import (
    FID_IDENTICAL_ATOL,
    PERTURBED_MIN_COSINE,
    PERTURBED_SQNR_MAX_DB,
    YARDSTICK_REPLAY_SQNR_RTOL,
)

REPO = Path(__file__).resolve().parents[2]
FAST = dict(seeds=(0, 1), steps=2, batch_size=4, progress=False)


def _tiny():
    pipe = zoo.load_pipeline("tiny")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def reference():
    return _tiny()


@pytest.fixture(scope="module")
def perturbed():
    pipe = _tiny()
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.01 * p.abs().mean())
    return pipe


@pytest.fixture(scope="module")
def prompts():
    return default_prompts(2)


@pytest.mark.slow
def test_a_pipeline_against_itself_gives_the_known_answers(reference, prompts, tmp_path):
    result = evaluate(reference, reference, prompts, YardstickConfig(**FAST))
    r = result.results
    steps = len(reference.scheduler.timesteps)
    for key in ("same_inputs", "candidate_trajectory"):
        noise = r["noise"][key]
        assert len(noise["sqnr_db"]) == steps and all(math.isinf(v) for v in noise["sqnr_db"])
        assert noise["cosine"] == [1.0] * steps and noise["mse"] == [0.0] * steps
    assert math.isinf(r["image"]["psnr_db"]) and r["image"]["ssim"]["min"] == pytest.approx(1.0)
    assert r["fid"]["candidate_vs_reference"] < FID_IDENTICAL_ATOL
    assert r["judge"]["flip_rate"] == 0.0
    assert r["judge"]["reference_accuracy"] == r["judge"]["candidate_accuracy"]
    assert r["config"]["num_samples"] == len(r["samples"]) == 4

    paths = write_report(result, tmp_path)
    saved = json.loads(paths["json"].read_text())  # strict JSON: inf is written as "inf"
    assert saved["image"]["psnr_db"] == "inf" and saved["noise"]["same_inputs"]["sqnr_db_pooled"] == "inf"
    assert paths["sqnr_plot"].stat().st_size > 0 and paths["pairs"].stat().st_size > 0
    assert "label flip rate" in format_table(r)


def test_a_perturbed_unet_gives_finite_sqnr_and_psnr(reference, perturbed, prompts):
    config = YardstickConfig(**FAST, fid=False, judge=False)
    r = evaluate(reference, perturbed, prompts, config).results
    for key in ("same_inputs", "candidate_trajectory"):
        sqnr = r["noise"][key]["sqnr_db"]
        cosines = r["noise"][key]["cosine"]
        assert len(sqnr) == len(cosines) == len(perturbed.scheduler.timesteps)
        assert all(0.0 < v < PERTURBED_SQNR_MAX_DB for v in sqnr)
        assert all(PERTURBED_MIN_COSINE < c < 1.0 for c in cosines)
    assert math.isfinite(r["image"]["psnr_db"]) and r["image"]["ssim"]["max"] <= 1.0
    assert r["fid"] is None and r["judge"] is None


def test_same_inputs_metrics_compare_the_two_unets_on_recorded_reference_inputs(reference, perturbed, prompts):
    config = YardstickConfig(seeds=(0,), steps=2, batch_size=1, progress=False, fid=False, judge=False)
    r = evaluate(reference, perturbed, prompts[:1], config).results
    with record_unet_calls(reference.unet) as calls:
        reference(
            prompts[0][0],
            num_inference_steps=2,
            guidance_scale=config.guidance,
            generator=[torch.Generator().manual_seed(0)],
            output_type="pt",
        )
    from dgq.eval import metrics

    expected = [metrics.sqnr_db(c.output, replay(perturbed.unet, c)) for c in calls]
    assert r["noise"]["same_inputs"]["sqnr_db"] == pytest.approx(expected, rel=YARDSTICK_REPLAY_SQNR_RTOL)
    assert r["noise"]["same_inputs"]["timesteps"] == [c.timestep for c in calls]


def test_the_same_seeds_give_identical_numbers(reference, perturbed, prompts):
    config = YardstickConfig(seeds=(0,), steps=2, progress=False, fid=False)
    a = evaluate(reference, perturbed, prompts, config).results
    b = evaluate(reference, perturbed, prompts, config).results
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_noise_fidelity_needs_a_module_unet(reference, prompts):
    class Wrapper:  # a pipeline-like object whose unet is a plain callable
        def __init__(self, pipe):
            self.unet = lambda *a, **k: pipe.unet(*a, **k)
            self._pipe = pipe

        def __call__(self, *args, **kwargs):
            return self._pipe(*args, **kwargs)

    with pytest.raises(TypeError, match=r"nn\.Module"):
        evaluate(reference, Wrapper(reference), prompts[:1], YardstickConfig(**FAST, fid=False, judge=False))
    config = YardstickConfig(seeds=(0,), steps=2, progress=False, noise_fidelity=False, fid=False, judge=False)
    r = evaluate(reference, Wrapper(reference), prompts[:1], config).results
    assert r["noise"] is None and math.isinf(r["image"]["psnr_db"])


def test_balanced_prompts_interleave_classes():
    prompts = [("a0", 0), ("a1", 0), ("b0", 1), ("c0", 2), ("b1", 1)]
    assert balanced_prompts(prompts, 4) == [("a0", 0), ("b0", 1), ("c0", 2), ("a1", 0)]
    assert sorted(label for _, label in default_prompts(10)) == list(range(10))
    with pytest.raises(ValueError):
        balanced_prompts(prompts, 6)


def test_eval_subcommand_writes_results(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    eval_cli.add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "eval"
    args = parser.parse_args(
        [
            "eval",
            "--model",
            "tiny",
            "--candidate",
            "same",
            "--num-prompts",
            "2",
            "--seeds",
            "1",
            "--steps",
            "2",
            "--no-fid",
            "--out",
            str(out),
        ]
    )
    assert args.func(args) == 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["models"] == {"reference": "tiny", "candidate": "same"}
    assert saved["judge"]["flip_rate"] == 0.0 and saved["config"]["num_samples"] == 2
    assert "judge accuracy" in capsys.readouterr().out


@pytest.mark.slow
def test_eval_float_script_writes_json_and_grid(tmp_path):
    spec = importlib.util.spec_from_file_location("eval_float", REPO / "scripts" / "eval_float.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "float"
    argv = [
        "--model",
        "tiny",
        "--num-prompts",
        "2",
        "--seeds",
        "1",
        "--steps",
        "2",
        "--num-real",
        "2",
        "--no-baseline",
        "--out",
        str(out),
    ]
    assert module.main(argv) == 0
    saved = json.loads((out / "float_eval.json").read_text())
    assert saved["fid"]["num_generated"] == 2 and saved["fid"]["generated_vs_real_test"] > 0
    assert 0.0 <= saved["judge"]["accuracy"] <= 1.0
    assert (out / "samples_grid.png").stat().st_size > 0
