"""Calibration shared by several processes (dgq.distributed): the split, the collectives, and the
recipe of a 2-process run against the 1-process one, byte for byte."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dgq import distributed
from dgq.distributed import Shard, ShardError

REPO = Path(__file__).resolve().parents[2]


def test_shards_cover_every_batch_once_in_order():
    items = list(range(7))
    parts = [Shard(r, 3).take(items) for r in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(i for part in parts for i in part) == items
    assert Shard().take(items) == items


def test_more_processes_than_batches_is_refused():
    with pytest.raises(ShardError, match="3 processes but only 2 batches"):
        Shard(0, 3).take([0, 1])


def test_one_process_needs_no_process_group():
    assert distributed.current() == Shard(0, 1)
    t = torch.tensor([1.0, -2.0])
    assert distributed.all_reduce([t], "min")[0] is t
    assert distributed.gather_object({"a": 1}) == [{"a": 1}]
    assert distributed.map_shared([1, 2, 3], lambda v: 10 * v) == [10, 20, 30]
    distributed.agree([1, 2], "anything")


def _collectives(rank: int, world: int, init_file: str, results) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        a = torch.tensor([float(rank), 10.0 - rank, 5.0])
        b = torch.tensor([[rank * 2.0]])
        lo = distributed.all_reduce([a, b], "min")
        hi = distributed.all_reduce([a, b], "max")
        total = distributed.all_reduce([torch.tensor([rank + 1])], "sum")[0]
        gathered = distributed.gather_object({"rank": rank})
        # items shared out by rank, every result on every process, in item order
        mapped = distributed.map_shared([10, 20, 30], lambda v: (v, torch.distributed.get_rank()))
        try:
            distributed.agree(rank, "values")
            agreed = "agreed"
        except ShardError as err:
            agreed = str(err)
        results[rank] = (lo, hi, total, gathered, mapped, agreed, distributed.current())
    finally:
        torch.distributed.destroy_process_group()


def test_collectives_over_two_processes(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_collectives, args=(2, str(tmp_path / "rendezvous"), results), nprocs=2)
    for rank in range(2):
        lo, hi, total, gathered, mapped, agreed, shard = results[rank]
        assert torch.equal(lo[0], torch.tensor([0.0, 9.0, 5.0])) and torch.equal(lo[1], torch.tensor([[0.0]]))
        assert torch.equal(hi[0], torch.tensor([1.0, 10.0, 5.0])) and torch.equal(hi[1], torch.tensor([[2.0]]))
        assert int(total) == 3
        assert gathered == ([{"rank": 0}, {"rank": 1}] if rank == 0 else None)
        assert mapped == [(10, 0), (20, 1), (30, 0)]
        assert "process 1 saw other values than process 0" in agreed
        assert shard == Shard(rank, 2)


def _run(cmd: list[str], processes: int) -> str:
    """``dgq <cmd>`` in 1 process or under torchrun; its stdout. One thread per process in every run:
    torch's CPU kernels may round differently with another thread count, which would change the
    activations themselves (not the merge)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launcher = (
        [] if processes == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    )
    res = subprocess.run(
        [sys.executable, *launcher, "-m", "app.cli", *cmd],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def _calibrate(args: list[str], out: Path, processes: int) -> None:
    assert f"on {processes} process(es)" in _run(["calibrate", *args, "--out", str(out)], processes)


def test_two_processes_write_the_recipe_one_process_writes(tmp_path):
    # The onnxruntime profile: its output calibration (a second, quantized pass) is sharded too.
    args = ["--model", "tiny", "--profile", "onnxruntime", "--num-prompts", "4", "--steps", "2"]
    args += ["--batch-size", "1", "--device", "cpu"]
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    _calibrate(args, one, 1)
    _calibrate(args, two, 2)
    assert one.read_bytes() == two.read_bytes()


def test_two_processes_evaluate_as_one(tmp_path, tiny_recipe):
    recipe = tiny_recipe.save(tmp_path / "r.safetensors")
    args = ["eval", "--model", "tiny", "--recipe", str(recipe), "--num-prompts", "3", "--seeds", "1", "--steps", "2"]
    args += ["--batch-size", "1", "--no-fid", "--device", "cpu"]
    results = {}
    for n in (1, 2):
        assert f"sampled on {n} process(es)" in _run([*args, "--out", str(tmp_path / f"eval{n}")], n)
        results[n] = json.loads((tmp_path / f"eval{n}" / "results.json").read_text())
    assert results[1]["noise"]["same_inputs"]["sqnr_db"]  # the comparison below compares something
    assert results[1] == results[2]
