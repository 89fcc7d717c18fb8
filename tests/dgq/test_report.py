import copy

from dgq.eval.metrics import first_divergence
from dgq.report import layer_errors, write_layer_report
from tests.tolerances import REPORT_BROKEN_LAYER_MAX_SQNR_DB, REPORT_DIVERGED_DB


def test_first_divergence_names_the_broken_layer(tiny_pipe, tiny_recipe, tmp_path):
    recipe = copy.copy(tiny_recipe)
    recipe.acts, recipe.probs = {}, {}
    recipe.weights = dict(tiny_recipe.weights)
    clean = layer_errors(tiny_pipe, recipe, "a photo of a cat", steps=2)
    assert first_divergence(clean, REPORT_DIVERGED_DB) is None
    victim = "up_blocks.1.resnets.0.conv1"
    broken = copy.copy(recipe.weights[victim])
    broken.scale = broken.scale * 200  # nearly every weight rounds to the zero point
    recipe.weights[victim] = broken
    errors = layer_errors(tiny_pipe, recipe, "a photo of a cat", steps=2)
    names = [e.name for e in errors]
    assert names == [e.name for e in clean]
    hit = first_divergence(errors, REPORT_DIVERGED_DB)
    assert hit is not None and hit.name == victim and hit.sqnr_db < REPORT_BROKEN_LAYER_MAX_SQNR_DB
    paths = write_layer_report(errors, tiny_recipe, tmp_path)
    assert all(p.stat().st_size > 0 for p in paths.values())
