"""The TensorRT runner's shared device-memory pool, through the stand-ins for TensorRT and torch.cuda."""

import pytest

from runtime.runners import DeviceMemoryPool, RunnerError
from tests.runtime.trt_standins import FakeNetwork, unet_like_compute, unet_like_feed, unet_like_spec


def _network(scratch_bytes: int) -> FakeNetwork:
    return FakeNetwork(unet_like_spec(), unet_like_compute, scratch_bytes=scratch_bytes)


def test_engines_share_one_buffer_that_grows_to_the_largest_need(standin):
    pool = DeviceMemoryPool()
    small = standin.runner(_network(1000), memory_pool=pool, cuda_graph=True)
    big = standin.runner(_network(5000), memory_pool=pool)
    feed = unet_like_feed(small.spec)
    with small:
        assert small.context.strategy.name == "USER_MANAGED" and pool.nbytes == 1000
        small.infer(feed)
        small.infer(feed)  # replays the graph captured by the first call
        assert small.context.memory_bindings == [(pool.buffer.data_ptr(), 1000)]
        assert standin.cuda.captures == 1
        with big:
            assert pool.nbytes == 5000
            big.infer(feed)
            small.infer(feed)  # the pool grew: the small engine rebinds to the new buffer and captures again
            assert (
                small.context.memory_bindings[-1] == big.context.memory_bindings[-1] == (pool.buffer.data_ptr(), 5000)
            )
            assert standin.cuda.captures == 2
            n = len(small.context.memory_bindings)
            small.infer(feed)  # unchanged pool: no rebinding, the graph replays
            assert len(small.context.memory_bindings) == n and standin.cuda.captures == 2
        assert pool.nbytes == 5000  # still held by the small engine
    assert pool.nbytes == 0


def test_without_the_api_the_context_owns_its_memory(standin, monkeypatch):
    monkeypatch.delattr(standin.modules["tensorrt"], "ExecutionContextAllocationStrategy")
    pool = DeviceMemoryPool()
    runner = standin.runner(_network(10), memory_pool=pool)
    with runner:
        runner.infer(unet_like_feed(runner.spec))
        assert runner.context.strategy.name == "STATIC" and runner.memory_pool is None
    assert pool.nbytes == 0 and runner.context is None


def test_pool_refuses_a_second_device():
    pool = DeviceMemoryPool(device="cpu")
    pool.reserve(16, device="cpu:0")  # cpu and cpu:0 are one device
    with pytest.raises(RunnerError, match=r"pool is on cpu but a runner sharing it runs on meta"):
        pool.reserve(16, device="meta")
