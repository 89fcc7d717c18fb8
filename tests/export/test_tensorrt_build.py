"""The IO spec's shape profiles drive a TensorRT build (TensorRT-RTX's builder runs without a GPU)."""

import importlib

import pytest

from export.iospec import specs_from_json
from runtime.build import TENSORRT_MODULES

pytestmark = [pytest.mark.trt, pytest.mark.slow]


def tensorrt():
    for name in TENSORRT_MODULES:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    pytest.skip("needs the tensorrt or tensorrt_rtx module")


@pytest.mark.parametrize("component", ["unet", "text_encoder", "vae_decoder"])
def test_float_graph_builds_strongly_typed_with_spec_profile(exported, component):
    trt = tensorrt()
    spec = specs_from_json(exported["iospec"].read_text())[component]
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(exported[component])), [
        parser.get_error(i).desc() for i in range(parser.num_errors)
    ]
    assert [network.get_input(i).name for i in range(network.num_inputs)] == spec.input_names
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in spec.shape_profile().items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    assert plan is not None and plan.nbytes > 0
