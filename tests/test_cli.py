import argparse
import json

import pytest

from app.cli import build_parser, main


def _subparsers_action(parser):
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def _commands(parser, prefix=()):
    """(command path, parser, its one-line help) of every subcommand, nested ones included."""
    action = _subparsers_action(parser)
    helps = {a.dest: a.help for a in action._choices_actions}
    for name, sub in action.choices.items():
        yield (*prefix, name), sub, helps.get(name)
        if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
            yield from _commands(sub, (*prefix, name))


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in ("quickstart", "zoo", "generate", "calibrate", "inspect", "report", "export", "build", "eval"):
        assert f"    {name} " in out, name


def test_every_subcommand_and_option_is_documented():
    commands = list(_commands(build_parser()))
    assert {path[0] for path, _, _ in commands} >= {"quickstart", "zoo", "generate", "calibrate", "export", "build"}
    assert ("zoo", "save") in [path for path, _, _ in commands]
    undocumented = []
    for path, sub, one_line in commands:
        if not one_line:
            undocumented.append(f"{' '.join(path)}: no help line in its parent's listing")
        if len(path) == 1 and not sub.description:
            undocumented.append(f"{' '.join(path)}: no description")
        for action in sub._actions:
            if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) and not action.help:
                undocumented.append(f"{' '.join(path)} {action.option_strings or action.dest}: no help")
    assert not undocumented, undocumented


def test_quickstart_runs_the_main_job(tmp_path, capsys):
    out = tmp_path / "qs"
    argv = ["quickstart", "--model", "tiny", "--steps", "2", "--num-images", "2", "--calibration-prompts", "2"]
    assert main([*argv, "--no-engines", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "parity against the float PyTorch pipeline" in printed and str(out / "grid.png") in printed
    assert "TensorRT engines: not built (--no-engines)" in printed
    assert (out / "model" / "model_index.json").is_file()
    assert {p.name for p in (out / "recipes").iterdir()} == {"onnxruntime.safetensors", "tensorrt.safetensors"}
    for target in ("float", "onnxruntime", "tensorrt"):
        manifest = json.loads((out / "exports" / target / "manifest.json").read_text())
        assert manifest["target"] == target
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "tiny" and summary["steps"] == 2 and len(summary["prompts"]) == 2
    assert set(summary["unet_ms_per_call"]) == {"float", "onnxruntime", "tensorrt"}
    # The float export through the runtime reproduces PyTorch's images (uint8); the quantized ones
    # are close but not equal (a quantizer that did nothing would give inf here too).
    assert summary["parity"]["float-export"]["psnr_db_vs_float"] > 40
    for target in ("onnxruntime", "tensorrt"):
        assert 20 < summary["parity"][target]["psnr_db_vs_float"] < float("inf")
    _onnxruntime_export_keeps_small_layers_float(out)
    from PIL import Image

    from app.quickstart import CELL, HEADER, LABEL

    assert Image.open(out / "grid.png").size == (LABEL + 3 * CELL, HEADER + 2 * CELL)  # 3 columns x 2 prompts
    assert Image.open(out / "images" / "tensorrt_001.png").size == (32, 32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qs"]


def _onnxruntime_export_keeps_small_layers_float(out):
    """The onnxruntime target's default calibration applies its speed rule, and the graph follows the
    recipe: a quantized weight exactly where the recipe has a layer, a float weight everywhere else."""
    import onnx

    from dgq.config import ORT_MIN_INTENSITY
    from dgq.recipe import load

    recipe = load(out / "recipes" / "onnxruntime.safetensors")
    assert recipe.config.min_intensity == ORT_MIN_INTENSITY
    graph = onnx.load(str(out / "exports" / "onnxruntime" / "unet.onnx")).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    layers = {"conv": ("Conv",), "linear": ("MatMul", "Gemm", "MatMulInteger")}
    weights = {k: [n.input[1] for n in graph.node if n.op_type in ops] for k, ops in layers.items()}
    initial = {t.name for t in graph.initializer}
    integer = {t.name for t in graph.initializer if t.data_type != onnx.TensorProto.FLOAT}
    # a quantized weight: DequantizeLinear's output, or an int8 initializer MatMulInteger reads
    quantized = {k: sum(producer.get(w) == "DequantizeLinear" or w in integer for w in ws) for k, ws in weights.items()}
    float_weights = {k: sum(w in initial - integer for w in ws) for k, ws in weights.items()}
    assert quantized["conv"] == len(recipe.weights) > 0 and float_weights["conv"] > 0
    assert quantized["linear"] == 0 < float_weights["linear"]  # the tiny model's Linears are all below the rule


def test_generate_is_seeded_per_image(tmp_path):
    import numpy as np
    from PIL import Image

    def run(name, *extra):
        assert main(["generate", "--model", "tiny", "--steps", "2", "--out", str(tmp_path / name), *extra]) == 0
        return [np.asarray(Image.open(p)) for p in sorted((tmp_path / name).glob("image_*.png"))]

    (a,) = run("a", "--image-seed", "3")
    (again,) = run("again", "--image-seed", "3")
    (other,) = run("other", "--image-seed", "4")
    pair = run("pair", "--image-seed", "3", "--num-images", "2")
    assert a.shape == (32, 32, 3) and np.array_equal(a, again)
    assert not np.array_equal(a, other)  # the seed reaches the noise
    # image i of a run has seed --image-seed + i, whatever else is in the run
    assert len(pair) == 2 and np.array_equal(pair[0], a) and np.array_equal(pair[1], other)


def test_user_errors_exit_2_with_one_line_and_bugs_keep_their_traceback(caplog):
    from app.cli import run_command
    from runtime.runners import RunnerError

    def fails(exc):
        def handler(_args):
            raise exc

        return handler

    for exc in (RunnerError("engine not active"), ValueError("bad --steps"), FileExistsError("out exists")):
        caplog.clear()
        assert run_command(fails(exc), None) == 2
        assert [r.getMessage() for r in caplog.records] == [str(exc)]
    with pytest.raises(KeyError):
        run_command(fails(KeyError("a bug")), None)
    assert run_command(lambda _args: None, None) == 0


def test_calibrate_inspect_and_refusals(tmp_path, capsys, caplog):
    out = tmp_path / "r.safetensors"
    args = [
        "calibrate",
        "--model",
        "tiny",
        "--steps",
        "2",
        "--num-prompts",
        "2",
        "--groups",
        "4",
        "--abits",
        "6",
        "--weight-init",
        "minmax",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"recipe: {out}" in printed and "W8A6, K=4" in printed
    assert main(["inspect", str(out), "--top", "2"]) == 0
    summary = capsys.readouterr().out
    assert "timestep slots (2)" in summary and "largest outlier groups" in summary
    assert main(args) == 2  # exists, no --overwrite
    assert main([*args[:-1], str(tmp_path / "no-such-dir" / "r.safetensors")]) == 2
    assert main(["inspect", str(tmp_path / "missing.safetensors")]) == 2
    # --no-fold-groups is a tensorrt-profile switch: refused with another profile, nothing written
    assert main([*args[:-2], "--no-fold-groups", "--out", str(tmp_path / "nf.safetensors")]) == 2
    assert "--no-fold-groups applies to --profile tensorrt" in caplog.text
    # A sampler diffusers has not, or one that does not fit this model: refused, nothing written.
    with pytest.raises(SystemExit) as stop:
        main([*args[:-2], "--scheduler", "dpm+++", "--out", str(tmp_path / "s.safetensors")])
    assert stop.value.code == 2
    flow = ["--scheduler", "FlowMatchEulerDiscreteScheduler", "--out", str(tmp_path / "s.safetensors")]
    assert main([*args[:-2], *flow]) == 2
    assert "is not compatible with this model's PNDMScheduler" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.safetensors"]
    # Calibrated with another sampler: the recipe says which, and its slots are that sampler's timesteps.
    euler = tmp_path / "euler.safetensors"
    assert main([*args[:-2], "--scheduler", "euler", "--out", str(euler)]) == 0
    from dgq.recipe import load

    recipe = load(euler)
    assert recipe.meta["scheduler"] == "EulerDiscreteScheduler"
    from dgq import schedulers, zoo

    sampler = schedulers.swap(zoo.build_pipeline("tiny").scheduler, "euler")
    sampler.set_timesteps(2)
    assert recipe.slots == [float(t) for t in sampler.timesteps]
    # Its export saves that sampler, so the runtime's default is the calibrated setting.
    folder = tmp_path / "euler_export"
    export = ["export", "--model", "tiny", "--recipe", str(euler), "--target", "faithful"]
    assert main([*export, "--out", str(folder)]) == 0
    saved = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "EulerDiscreteScheduler"


def test_min_intensity_on_calibrate_and_export(tmp_path, capsys, caplog):
    """dgq calibrate --profile onnxruntime applies the target's speed rule unless told otherwise;
    dgq export refuses the option where no calibration runs. Nothing written on a refusal."""
    from dgq.config import ORT_MIN_INTENSITY
    from dgq.recipe import load

    base = ["calibrate", "--model", "tiny", "--steps", "2", "--num-prompts", "1", "--weight-init", "minmax"]
    ort, every = tmp_path / "ort.safetensors", tmp_path / "every.safetensors"
    assert main([*base, "--profile", "onnxruntime", "--out", str(ort)]) == 0
    assert f"layers under {ORT_MIN_INTENSITY:g} multiply-adds per element" in capsys.readouterr().out
    assert main([*base, "--profile", "onnxruntime", "--min-intensity", "0", "--out", str(every)]) == 0
    ruled, all_layers = load(ort), load(every)
    assert ruled.config.min_intensity == ORT_MIN_INTENSITY and all_layers.config.min_intensity == 0
    assert set(ruled.weights) < set(all_layers.weights)
    with pytest.raises(SystemExit) as stop:
        main([*base, "--min-intensity", "-1", "--out", str(tmp_path / "bad.safetensors")])
    assert stop.value.code == 2
    export = ["export", "--model", "tiny", "--target", "onnxruntime", "--min-intensity", "10"]
    assert main([*export, "--recipe", str(ort), "--out", str(tmp_path / "x")]) == 2
    assert "the recipe already fixes them" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["every.safetensors", "ort.safetensors"]
