import copy

from dgq.eval.metrics import first_divergence
from dgq.report import layer_errors, write_layer_report

# Weights-only W8 keeps every layer far above this; a broken layer falls far below it.
DIVERGED_DB = 20.0


def test_first_divergence_names_the_broken_layer(tiny_pipe, tiny_recipe, tmp_path):
    recipe = copy.copy(tiny_recipe)
    recipe.acts, recipe.probs = {}, {}
    recipe.weights = dict(tiny_recipe.weights)
    clean = layer_errors(tiny_pipe, recipe, "a photo of a cat", steps=2)
    assert first_divergence(clean, DIVERGED_DB) is None
    victim = "up_blocks.1.resnets.0.conv1"
    broken = copy.copy(recipe.weights[victim])
    broken.scale = broken.scale * 200  # nearly every weight rounds to the zero point
    recipe.weights[victim] = broken
    errors = layer_errors(tiny_pipe, recipe, "a photo of a cat", steps=2)
    names = [e.name for e in errors]
    assert names == [e.name for e in clean]
    hit = first_divergence(errors, DIVERGED_DB)
    assert hit is not None and hit.name == victim and hit.sqnr_db < 10
    paths = write_layer_report(errors, tiny_recipe, tmp_path)
    assert all(p.stat().st_size > 0 for p in paths.values())
