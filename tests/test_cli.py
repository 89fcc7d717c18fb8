import json

import pytest

from app.cli import build_parser, main


def _subcommands(parser):
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in ("quickstart", "zoo", "generate"):
        assert name in out


def test_every_subcommand_has_help(capsys):
    for name, sub in _subcommands(build_parser()).items():
        text = sub.format_help()
        assert sub.description or sub.format_usage(), name
        assert "--help" in text or "-h" in text


def test_quickstart_writes_model_image_and_summary(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--model", "tiny", "--steps", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out / "images" / "float_000.png") in printed
    assert (out / "model" / "model_index.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "tiny" and summary["steps"] == 2
    from PIL import Image

    assert Image.open(out / "images" / "float_000.png").size == (32, 32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qs"]


def test_generate_is_seeded(tmp_path):
    import numpy as np
    from PIL import Image

    for run in ("a", "b"):
        assert main(["generate", "--model", "tiny", "--steps", "2", "--out", str(tmp_path / run)]) == 0
    a = np.asarray(Image.open(tmp_path / "a" / "image_000.png"))
    b = np.asarray(Image.open(tmp_path / "b" / "image_000.png"))
    assert a.shape == (32, 32, 3) and np.array_equal(a, b)


def test_calibrate_inspect_and_refusals(tmp_path, capsys):
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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.safetensors"]
