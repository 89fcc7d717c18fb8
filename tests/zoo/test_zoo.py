import json

import pytest
import torch
from diffusers import UNet2DConditionModel

from app.cli import main as cli_main
from dgq import zoo
from dgq.fingerprint import config_hash, model_identity, weights_hash
from dgq.zoo import configs
from dgq.zoo.clip_tokenizer import build_clip_tokenizer

ASTRONAUT_IDS = [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]

# Parameter counts of the published UNets (a check that the configs are the real ones).
PUBLISHED_UNET_PARAMS = {
    "sd15": (configs.SD15_UNET, 859_520_964),
    "sd21": (configs.SD21_UNET, 865_910_724),
    "sdxl": (configs.SDXL_UNET, 2_567_463_684),
}


def test_tokenizer_matches_clip_ids():
    tok = build_clip_tokenizer()
    assert len(tok) == 49408
    assert tok("a photograph of an astronaut riding a horse").input_ids == ASTRONAUT_IDS
    padded = tok("a horse", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[:4] == [49406, 320, 4558, 49407] and set(padded[4:]) == {49407}


def test_tiny_is_deterministic_per_seed():
    a = zoo.build_pipeline("tiny", seed=0)
    b = zoo.build_pipeline("tiny", seed=0)
    c = zoo.build_pipeline("tiny", seed=1)
    for name in ("unet", "text_encoder", "vae"):
        assert weights_hash(getattr(a, name)) == weights_hash(getattr(b, name))
        assert weights_hash(getattr(a, name)) != weights_hash(getattr(c, name))


def test_components_subset_gives_the_same_weights():
    full = zoo.build_pipeline("tiny", seed=3)
    unet_only = zoo.build_pipeline("tiny", seed=3, components=["unet"])
    assert unet_only.vae is None and unet_only.text_encoder is None
    assert weights_hash(unet_only.unet) == weights_hash(full.unet)
    with pytest.raises(ValueError, match="unknown component"):
        zoo.build_pipeline("tiny", components=["unet", "refiner"])


def test_tiny_round_trips_through_save_pretrained(tmp_path):
    pipe = zoo.build_pipeline("tiny", seed=0)
    pipe.save_pretrained(tmp_path / "tiny")
    loaded = zoo.load_pipeline(str(tmp_path / "tiny"))
    for name in ("unet", "text_encoder", "vae"):
        assert model_identity(getattr(loaded, name)) == model_identity(getattr(pipe, name))
    assert loaded.tokenizer("a photograph of an astronaut riding a horse").input_ids == ASTRONAUT_IDS
    assert type(loaded.scheduler).__name__ == type(pipe.scheduler).__name__
    kwargs = dict(num_inference_steps=2, height=32, width=32, output_type="np")
    x = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    y = loaded("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert x.shape == (1, 32, 32, 3)
    assert torch.equal(torch.from_numpy(x), torch.from_numpy(y))


@pytest.mark.parametrize("name", sorted(PUBLISHED_UNET_PARAMS))
def test_sd_unet_configs_have_the_published_size(name):
    cfg, expected = PUBLISHED_UNET_PARAMS[name]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    assert sum(p.numel() for p in unet.parameters()) == expected


def test_config_hash_ignores_bookkeeping_keys():
    cfg = dict(configs.SD15_UNET)
    assert config_hash(cfg) == config_hash({**cfg, "_diffusers_version": "x"})
    assert config_hash(cfg) != config_hash({**cfg, "layers_per_block": 1})


def test_missing_model_folder_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(zoo.ModelLoadError, match="does not exist"):
        zoo.load_pipeline(str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(zoo.ModelLoadError, match=r"model_index\.json"):
        zoo.load_pipeline(str(tmp_path / "empty"))
    with pytest.raises(zoo.ModelLoadError, match="no zoo model"):
        zoo.build_pipeline("sd99")


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(zoo.ModelLoadError, match="hub did not provide it"):
        zoo.load_pipeline("no-such-org/no-such-model")


def test_cli_reports_missing_model_and_writes_nothing(tmp_path, caplog):
    out = tmp_path / "images"
    rc = cli_main(["generate", "--model", str(tmp_path / "nope"), "--out", str(out)])
    assert rc == 2
    assert "does not exist" in caplog.text
    assert not out.exists()


def test_cli_zoo_save_writes_a_loadable_folder(tmp_path):
    out = tmp_path / "saved"
    assert cli_main(["zoo", "save", "tiny", str(out)]) == 0
    index = json.loads((out / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert cli_main(["zoo", "save", "tiny", str(out)]) == 2  # exists, no --overwrite
    assert [p.name for p in tmp_path.iterdir()] == ["saved"]  # no temp folders left behind
