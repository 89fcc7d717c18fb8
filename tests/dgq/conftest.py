import pytest

from dgq import zoo
from dgq.calibrate import calibrate
from dgq.config import preset

CAL_PROMPTS = ["a photo of a cat", "a red car on a street", "an astronaut riding a horse"]
CAL_STEPS = 4


@pytest.fixture(scope="session")
def tiny_pipe():
    pipe = zoo.build_pipeline("tiny", seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# Weight MSE search is covered by tests/quant and test_calibrate; min-max keeps these fixtures fast.
@pytest.fixture(scope="session")
def tiny_recipe(tiny_pipe):
    return calibrate(tiny_pipe, CAL_PROMPTS, preset("dgq", groups=8, weight_init="minmax"), num_inference_steps=CAL_STEPS, progress=False)


@pytest.fixture(scope="session")
def tiny_recipe_trt(tiny_pipe):
    cfg = preset("dgq", groups=8, profile="tensorrt", outlier_bits=16, weight_init="minmax")
    return calibrate(tiny_pipe, CAL_PROMPTS, cfg, num_inference_steps=CAL_STEPS, progress=False)
