import pytest

from dgq import zoo
from export.float_export import export_float


@pytest.fixture(scope="session")
def tiny_pipe():
    return zoo.build_pipeline("tiny", seed=0)


@pytest.fixture(scope="session")
def exported(tiny_pipe, tmp_path_factory):
    """Float32 graphs of the tiny pipeline at the default profiles: {component: path, "iospec": path}."""
    return export_float(tiny_pipe, tmp_path_factory.mktemp("float") / "onnx")
