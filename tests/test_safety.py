"""No data loss, no silent wrong result: what the `dgq` command does with bad input, existing outputs,
concurrent writers, Ctrl-C and kills. Each test names the defect it guards against."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
TEMP_PREFIX = ".dgq-tmp."  # common.fsutil.TMP_PREFIX, spelled out: the tests check the files on disk


def _env(**extra) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def _dgq(*args: str, **kwargs) -> subprocess.Popen:
    """``dgq ARGS`` in a process of its own (stdout and stderr as text pipes unless given)."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen(
        [sys.executable, "-m", "app.cli", *args], text=True, env=kwargs.pop("env", _env()), cwd=ROOT, **kwargs
    )


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a command loads a model (a refusal must come before the work)."""
    from dgq import zoo

    def refuse(*args, **kwargs):
        raise AssertionError("the command loaded a model before refusing its output path")

    monkeypatch.setattr(zoo, "load_pipeline", refuse)
    monkeypatch.setattr(zoo, "build_pipeline", refuse)


# ---- --overwrite replaces only what dgq wrote, and is checked before the work ----------------------


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_export_overwrite_refuses_what_dgq_did_not_write(tmp_path, caplog, no_model, kind):
    out = tmp_path / "userdata"
    if kind == "folder":
        out.mkdir()
        (out / "thesis.txt").write_text("years of work")
    else:
        out.write_text("years of work")
    rc = main(["export", "--model", "tiny", "--target", "float", "--out", str(out), "--overwrite"])
    assert rc == 2
    (message,) = _errors(caplog)
    assert f"{out} exists and is not an export folder written by dgq" in message
    kept = out / "thesis.txt" if kind == "folder" else out
    assert kept.read_text() == "years of work" and _names(tmp_path) == ["userdata"]


def test_export_to_the_current_folder_is_refused_before_the_work(tmp_path, monkeypatch, caplog, no_model):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    assert main(["export", "--model", "tiny", "--target", "float", "--out", ".", "--overwrite"]) == 2
    assert f"{work} exists and is not an export folder written by dgq" in _errors(caplog)[0]
    assert _names(work) == ["notes.txt"] and _names(tmp_path) == ["work"]  # no hidden temporary folder either


def test_calibrate_onto_a_folder_fails_before_calibrating(tmp_path, caplog, no_model):
    out = tmp_path / "recipes"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["calibrate", "--model", "tiny", "--steps", "2", "--out", str(out), "--overwrite"]) == 2
    assert "is not a recipe written by dgq" in _errors(caplog)[0]
    assert _names(out) == ["keep.txt"]


def test_zoo_save_overwrite_replaces_its_own_folder_only(tmp_path, caplog):
    out = tmp_path / "model"
    assert main(["zoo", "save", "tiny", str(out)]) == 0
    assert main(["zoo", "save", "tiny", str(out), "--overwrite"]) == 0  # its own: replaced
    (out / "my-notes.txt").write_text("mine")  # no longer only what dgq wrote
    assert main(["zoo", "save", "tiny", str(out), "--overwrite"]) == 2
    assert "is not a model folder written by dgq" in _errors(caplog)[0]
    assert (out / "my-notes.txt").read_text() == "mine" and _names(tmp_path) == ["model"]


def test_quickstart_replaces_only_an_earlier_quickstart(tmp_path, caplog, no_model):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "summary.json").write_text("{}")  # a folder of the user's that happens to hold a summary
    assert main(["quickstart", "--model", "tiny", "--steps", "1", "--out", str(out)]) == 2
    assert "is not a quickstart folder written by dgq" in _errors(caplog)[0]
    assert _names(out) == ["summary.json"] and _names(tmp_path) == ["mine"]


# ---- arguments are validated when parsed, with the reason ---------------------------------------


GENERATE = ["generate", "--model", "tiny"]
CALIBRATE = ["calibrate", "--model", "tiny", "--out", "r.safetensors"]
EXPORT = ["export", "--model", "tiny", "--out", "e"]


@pytest.mark.parametrize(
    "argv, message",
    [
        ([*GENERATE, "--steps", "0"], "--steps: 0 is not in 1..1000"),
        ([*GENERATE, "--size", "0"], "--size: 0 is not a positive multiple of 8"),
        ([*GENERATE, "--size", "12"], "--size: 12 is not a positive multiple of 8"),
        ([*GENERATE, "--size", "4096"], "up to 2048"),
        ([*GENERATE, "--num-images", "0"], "--num-images: 0 is not >= 1"),
        ([*GENERATE, "--num-images", "-3"], "--num-images: -3 is not >= 1"),
        ([*GENERATE, "--guidance", "-1"], "--guidance: -1 is not a finite number >= 0"),
        ([*GENERATE, "--guidance", "nan"], "--guidance: nan is not a finite number"),
        ([*CALIBRATE, "--steps", "-1"], "--steps: -1 is not in 1..1000"),
        ([*CALIBRATE, "--steps", "0"], "--steps: 0 is not in 1..1000"),
        ([*CALIBRATE, "--batch-size", "0"], "--batch-size: 0 is not >= 1"),
        ([*CALIBRATE, "--groups", "0"], "--groups: 0 is not >= 1"),
        ([*CALIBRATE, "--num-prompts", "0"], "--num-prompts: 0 is not >= 1"),
        ([*EXPORT, "--opset", "5"], "--opset: invalid choice: 5"),
        ([*EXPORT, "--opset", "99"], "--opset: invalid choice: 99"),
        ([*EXPORT, "--max-batch", "0"], "--max-batch: 0 is not >= 1"),
        (["build", "e", "--workspace-gib", "0"], "--workspace-gib: 0 is not a finite number > 0"),
    ],
)
def test_bad_arguments_are_refused_when_parsed(argv, message, capsys, no_model):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_documented_edge_values_are_accepted():
    args = build_parser().parse_args([*GENERATE, "--guidance", "0", "--steps", "1", "--size", "8"])
    assert (args.guidance, args.steps, args.size, args.num_images) == (0.0, 1, 8, 1)
    assert build_parser().parse_args([*EXPORT, "--opset", "21"]).opset == 21


def test_library_calls_refuse_zero_steps_and_sizes():
    from dgq import zoo
    from dgq.calibrate import collect_statistics
    from dgq.generate import generate

    pipe = zoo.build_pipeline("tiny", seed=0)
    for steps in (0, -1):  # a ZeroDivisionError, and a recipe with no timestep slot, before
        with pytest.raises(ValueError, match=f"must be >= 1, got {steps}"):
            collect_statistics(pipe, ["a cat"], num_inference_steps=steps, progress=False)
    with pytest.raises(ValueError, match="positive multiple"):
        generate(pipe, ["a cat"], [0], steps=1, size=0)  # 0 used to mean "the model's size"


# ---- one line, exit 2 (or 130), nothing partial -------------------------------------------------


def test_damaged_model_folders_are_one_line(tmp_path, caplog):
    saved = tmp_path / "model"
    assert main(["zoo", "save", "tiny", str(saved)]) == 0
    weights = next((saved / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    caplog.clear()
    assert main(["generate", "--model", str(saved), "--steps", "1", "--out", str(tmp_path / "img")]) == 2
    assert "cannot be loaded" in _errors(caplog)[0]
    (saved / "model_index.json").write_text("{not json")
    caplog.clear()
    assert main(["generate", "--model", str(saved), "--steps", "1", "--out", str(tmp_path / "img")]) == 2
    assert len(_errors(caplog)) == 1 and "cannot be loaded" in _errors(caplog)[0]
    assert not (tmp_path / "img").exists()


def test_ctrl_c_exits_130_in_one_line_and_leaves_nothing(tmp_path, caplog):
    from app.cli import run_command
    from common.fsutil import atomic_dir

    def interrupted(_args):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "half.onnx").write_bytes(b"x")
            raise KeyboardInterrupt

    assert run_command(interrupted, None) == 130
    assert len(_errors(caplog)) == 1 and "interrupted" in _errors(caplog)[0]
    assert _names(tmp_path) == []


def test_out_of_memory_is_one_line(caplog):
    import torch

    from app.cli import run_command

    def too_big(_args):
        torch.empty(1 << 50)  # 4 PiB of float32: the allocator refuses it

    assert run_command(too_big, None) == 2
    (message,) = _errors(caplog)
    assert message.startswith("out of memory:") and "\n" not in message


def test_a_graph_of_another_model_is_one_line(tmp_path, caplog):
    """A wrong-model unet.onnx with a re-signed manifest: refused by its shapes, not an ONNX Runtime traceback."""
    import onnx
    from onnx import TensorProto, helper

    from export.manifest import read_manifest, write_manifest
    from tests.runtime.runtime_fixtures import export_tiny

    _, folder = export_tiny(tmp_path / "export")
    other = helper.make_graph(
        [helper.make_node("Identity", ["sample"], ["noise_pred"])],
        "other_unet",
        [
            helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["batch", 4, "height", "width"]),
            helper.make_tensor_value_info("timestep", TensorProto.FLOAT, []),
            helper.make_tensor_value_info("encoder_hidden_states", TensorProto.FLOAT, ["batch", 16, 384]),
        ],
        [helper.make_tensor_value_info("noise_pred", TensorProto.FLOAT, ["batch", 4, "height", "width"])],
    )
    onnx.save(helper.make_model(other, opset_imports=[helper.make_opsetid("", 17)]), folder / "unet.onnx")
    write_manifest(folder, read_manifest(folder))  # re-hashed, as a user copying graphs around might
    rc = main(["generate", "--onnx", str(folder), "--steps", "1", "--out", str(tmp_path / "img")])
    assert rc == 2
    (message,) = _errors(caplog)
    assert "input 'encoder_hidden_states' has shape ['batch', 16, 384]" in message and "not this export's" in message


# ---- two writers, a kill, Ctrl-C: real processes ------------------------------------------------


def test_two_exports_to_one_folder_one_wins_the_other_fails_fast(tmp_path):
    out = tmp_path / "export"
    args = ("export", "--model", "tiny", "--target", "float", "--components", "vae_decoder", "--out", str(out))
    procs = [_dgq(*args) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert "being written by another process" in loser or "already exists" in loser, loser
    assert "Traceback" not in loser
    from export.manifest import read_manifest

    assert read_manifest(out, verify=True)["components"] == ["vae_decoder"]
    assert _names(tmp_path) == ["export"]


def test_calibrate_while_another_process_writes_the_recipe_fails_at_once(tmp_path, caplog, no_model):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\nfrom common.fsutil import claim_output\n"
            "with claim_output(sys.argv[1]):\n    print('held', flush=True)\n    sys.stdin.readline()\n",
            str(tmp_path / "r.safetensors"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["calibrate", "--model", "tiny", "--out", str(tmp_path / "r.safetensors")]) == 2
        assert "being written by another process" in _errors(caplog)[0]
    finally:
        holder.communicate("\n", timeout=60)
    assert _names(tmp_path) == []


def _wait_for_temporary(parent: Path, proc: subprocess.Popen, timeout: float = 300) -> Path:
    """The hidden folder an export is writing, once it holds a file."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        for p in parent.iterdir():
            if p.name.startswith(".") and p.is_dir() and any(p.iterdir()):
                return p
        time.sleep(0.02)
    raise AssertionError(f"no temporary folder appeared (exit status {proc.poll()})")


@pytest.mark.slow
def test_sigkill_mid_export_then_a_rerun_leaves_nothing_behind(tmp_path):
    from export.manifest import read_manifest

    parent, scratch = tmp_path / "exports", tmp_path / "tmpdir"
    parent.mkdir()
    scratch.mkdir()
    env = _env(TMPDIR=str(scratch))
    args = ("export", "--model", "tiny", "--target", "float", "--out", str(parent / "out"))
    proc = _dgq(*args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_temporary(parent, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert [n for n in _names(parent) if n.startswith(".")]  # the kill left its temporaries
    rerun = _dgq(*args, env=env)
    _, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err
    # No temporary in the system's temporary folder either (tempfile's names start with "tmp"; the
    # libraries keep caches there, torch's inductor folder and ONNX Runtime's telemetry id, not leftovers).
    assert _names(parent) == ["out"] and [n for n in _names(scratch) if n.startswith("tmp")] == []
    read_manifest(parent / "out", verify=True)


def _default_sigint() -> None:
    """In the child before exec: SIGINT as a terminal delivers it. A suite started as a background job
    of a non-interactive shell (``make test &``) has SIGINT ignored, which every child inherits across
    exec; Python then installs no KeyboardInterrupt handler and Ctrl-C would be a no-op whatever the
    app does (seen: the export ran to completion, exit 0)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_mid_export_exits_130_and_leaves_nothing(tmp_path):
    parent = tmp_path / "exports"
    parent.mkdir()
    proc = _dgq(
        "export", "--model", "tiny", "--target", "float", "--out", str(parent / "out"), preexec_fn=_default_sigint
    )
    _wait_for_temporary(parent, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].endswith(
        "interrupted; nothing half-written was left behind"
    )
    assert _names(parent) == []


def test_no_unsafe_pickle_loading_in_the_sources():
    found = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in ROOT.rglob("*.py")
        if ".venv" not in p.parts and p != Path(__file__).resolve()
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if "weights_only=False" in line
    ]
    assert found == []


def test_generate_writes_its_images_and_timings_only(tmp_path):
    """A float export through the runtime writes the PNGs and timings.json, nothing else (no lock files)."""
    from tests.runtime.runtime_fixtures import export_tiny

    _, folder = export_tiny(tmp_path / "export")
    out = tmp_path / "img"
    assert main(["generate", "--onnx", str(folder), "--steps", "1", "--num-images", "2", "--out", str(out)]) == 0
    assert _names(out) == ["image_000.png", "image_001.png", "timings.json"]
    assert json.loads((out / "timings.json").read_text())["steps"] == 1


@pytest.mark.slow
def test_a_quantized_export_keeps_its_temporaries_beside_the_output(tmp_path, monkeypatch):
    """The float-size comparison and ONNX Runtime's optimized graph go to temporary folders beside the
    export under the project's prefix (a kill leaves them where the next run removes them), not to the
    system's temporary folder, where nothing would."""
    import tempfile

    from dgq import zoo
    from dgq.calibrate import build_recipe, collect_statistics
    from dgq.config import preset
    from export.qdq_export import export_onnx

    pipe = zoo.build_pipeline("tiny", seed=0)
    pipe.set_progress_bar_config(disable=True)
    stats = collect_statistics(pipe, ["a cat"], num_inference_steps=2, progress=False)
    recipe = build_recipe(stats, pipe.unet, preset("dgq", groups=2, profile="tensorrt", weight_init="minmax"), False)
    made = []
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp(*args, **kwargs):
        made.append(Path(real_mkdtemp(*args, **kwargs)))
        return str(made[-1])

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    out = tmp_path / "exports" / "trt"
    summary = export_onnx(pipe, out, recipe, "tensorrt", components=("unet",))
    assert summary.float_bytes["unet"] > 0 and summary.ort_integer_kernels is not None
    outside = [p for p in made if not p.is_relative_to(out.parent)]
    assert len(made) >= 3 and outside == []
    assert all(p.relative_to(out.parent).parts[0].startswith(TEMP_PREFIX) for p in made), made
    assert _names(out.parent) == ["trt"]
