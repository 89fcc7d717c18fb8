"""The TensorRT runner's shared device-memory pool, with stand-in TensorRT objects (no GPU here)."""

import types

from runtime.runners import DeviceMemoryPool, TensorRTRunner


class FakeContext:
    def __init__(self):
        self.bound = []

    def set_device_memory(self, ptr, size):
        self.bound.append((ptr, size))


class FakeEngine:
    def __init__(self, need):
        self.device_memory_size_v2 = need
        self.strategies = []

    def create_execution_context(self, strategy=None):
        self.strategies.append(strategy)
        return FakeContext()


FAKE_TRT = types.SimpleNamespace(ExecutionContextAllocationStrategy=types.SimpleNamespace(USER_MANAGED="user"))


def runner(pool):
    r = TensorRTRunner.__new__(TensorRTRunner)  # no engine file, no GPU: only the pool logic
    r.memory_pool, r._pool_generation, r._graph = pool, -1, None
    return r


def test_engines_share_one_buffer_that_grows_to_the_largest_need():
    pool = DeviceMemoryPool(device="cpu")
    small, big = runner(pool), runner(pool)
    e_small, e_big = FakeEngine(1000), FakeEngine(5000)
    small.context = small._create_context(FAKE_TRT, e_small)
    assert e_small.strategies == ["user"] and pool.nbytes == 1000
    small._bind_pool()
    assert small.context.bound == [(pool.buffer.data_ptr(), 1000)]
    small._graph = "captured"
    big.context = big._create_context(FAKE_TRT, e_big)
    assert pool.nbytes == 5000
    big._bind_pool()
    small._bind_pool()  # the pool grew: the small engine rebinds to the new buffer and drops its graph
    assert small.context.bound[-1] == big.context.bound[-1] == (pool.buffer.data_ptr(), 5000)
    assert small._graph is None
    n = len(small.context.bound)
    small._bind_pool()  # unchanged pool: no rebinding
    assert len(small.context.bound) == n


def test_without_the_api_the_context_owns_its_memory():
    r = runner(DeviceMemoryPool(device="cpu"))
    engine = FakeEngine(10)
    r.context = r._create_context(types.SimpleNamespace(), engine)
    assert engine.strategies == [None] and r.memory_pool is None
