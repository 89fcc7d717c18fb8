import pytest

from dgq import zoo
from dgq.calibrate import build_recipe, collect_statistics
from dgq.config import preset

CAL_PROMPTS = ["a photo of a cat", "a red car on a street", "an astronaut riding a horse"]
CAL_STEPS = 4


@pytest.fixture(scope="session")
def tiny_pipe():
    pipe = zoo.build_pipeline("tiny", seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_stats(tiny_pipe):
    return collect_statistics(tiny_pipe, CAL_PROMPTS, num_inference_steps=CAL_STEPS, progress=False)


# Weight MSE search is covered by tests/quant and the determinism test; min-max keeps these fast.
@pytest.fixture(scope="session")
def tiny_recipe(tiny_pipe, tiny_stats):
    return build_recipe(tiny_stats, tiny_pipe.unet, preset("dgq", groups=8, weight_init="minmax"), progress=False)


@pytest.fixture(scope="session")
def tiny_recipe_trt(tiny_pipe, tiny_stats):
    cfg = preset("dgq", groups=8, profile="tensorrt", outlier_bits=16, weight_init="minmax")
    return build_recipe(tiny_stats, tiny_pipe.unet, cfg, progress=False)
