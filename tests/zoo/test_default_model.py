import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from dgq import zoo
from dgq.zoo import default_model, fashion_data, train
from dgq.zoo.default_model import build_fashion

HAS_DATA = (fashion_data.DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file()
needs_data = pytest.mark.skipif(not HAS_DATA, reason="needs `apt-get install dataset-fashion-mnist`")


def _generate(pipe, prompt="a photo of a bag", steps=2, seed=0):
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt,
        num_inference_steps=steps,
        guidance_scale=4.0,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images


# ------------------------------------------------------------------------------------------- data


def test_class_names_and_captions():
    assert len(fashion_data.CLASS_NAMES) == 10 and fashion_data.CLASS_NAMES[9] == "ankle boot"
    assert len(fashion_data.CAPTION_TEMPLATES) >= 6
    rng = np.random.default_rng(0)
    for label, name in enumerate(fashion_data.CLASS_NAMES):
        phrasings = fashion_data.all_captions(label)
        assert len(set(phrasings)) == len(fashion_data.CAPTION_TEMPLATES)
        assert all(name in p for p in phrasings)
        assert name in fashion_data.caption(label, rng)
    assert "an ankle boot" in fashion_data.all_captions(9)[0]
    with pytest.raises(ValueError, match="label"):
        fashion_data.caption(10, rng)


def test_eval_prompts_cover_every_class():
    prompts = fashion_data.eval_prompts()
    assert sorted({label for _, label in prompts}) == list(range(10))
    assert all(fashion_data.CLASS_NAMES[label] in p for p, label in prompts)
    assert prompts == fashion_data.eval_prompts()


def test_to_model_images_format():
    images = np.zeros((2, 28, 28), np.uint8)
    images[0] = 255
    images[1, 10:18, 10:18] = 128
    x = fashion_data.to_model_images(images)
    assert x.shape == (2, 3, 64, 64) and x.dtype == torch.float32
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    # 56x56 item centred on black: 4-pixel black border, white item fills the middle
    assert (x[0, :, :4] == -1).all() and (x[0, :, -4:] == -1).all() and (x[0, :, :, :4] == -1).all()
    assert (x[0, :, 4:60, 4:60] == 1).all()
    with pytest.raises(ValueError, match="uint8"):
        fashion_data.to_model_images(images.astype(np.float32))


@needs_data
def test_load_fashion_mnist_test_split():
    images, labels = fashion_data.load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [1000] * 10


def test_load_fashion_mnist_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_data.load_fashion_mnist("train", root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        fashion_data.load_fashion_mnist("val")


# ---------------------------------------------------------------------------------------- training


def test_warmup_cosine_schedule():
    assert train.warmup_cosine(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert train.warmup_cosine(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert train.warmup_cosine(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert train.warmup_cosine(55, 10, 100, 0.1) == pytest.approx(0.55)
    assert train.warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)


@pytest.mark.slow
def test_unet_training_resumes_exactly(tmp_path):
    """Two steps in one run and one step + resume give bit-identical EMA weights."""
    gen = torch.Generator().manual_seed(0)
    mean, std = torch.randn(8, 4, 16, 16, generator=gen), torch.rand(8, 4, 16, 16, generator=gen) * 0.1
    labels = np.arange(8) % 10
    embeds = torch.randn(21, 16, 384, generator=gen)
    index = torch.arange(1, 21).reshape(10, 2)
    cfg = train.UNetTrainConfig(steps=2, batch_size=2, warmup_steps=1)
    whole, fig = train.train_unet(mean, std, labels, embeds, index, 0.5, cfg, tmp_path / "a.pt")
    train.train_unet(
        mean,
        std,
        labels,
        embeds,
        index,
        0.5,
        train.UNetTrainConfig(steps=1, batch_size=2, warmup_steps=1),
        tmp_path / "b.pt",
    )
    resumed, _ = train.train_unet(mean, std, labels, embeds, index, 0.5, cfg, tmp_path / "b.pt", resume=True)
    assert fig["steps"] == 2
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------------------------------- pipeline


def test_fashion_is_registered_as_default_model():
    assert zoo.ZOO["fashion"].trained
    assert zoo.DEFAULT_MODEL == "fashion"


def test_fashion_pipeline_builds_from_shipped_weights():
    pipe = build_fashion()
    assert pipe.unet.config.cross_attention_dim == 384 and pipe.unet.config.sample_size == 16
    assert pipe.vae_scale_factor == 4 and pipe.vae.config.scaling_factor > 0
    assert pipe.tokenizer.model_max_length == default_model.MAX_TOKENS
    assert type(pipe.text_encoder).__name__ == "BertModel" and pipe.unet.dtype == torch.float32
    betas = pipe.scheduler.config
    assert (betas.beta_start, betas.beta_end, betas.beta_schedule) == (0.00085, 0.012, "scaled_linear")


def test_fashion_components_subset():
    pipe = build_fashion(components=("unet",))
    assert pipe.vae is None and pipe.text_encoder is None and pipe.unet is not None
    with pytest.raises(ValueError, match="unknown component"):
        build_fashion(components=("unet", "refiner"))


def test_fashion_missing_weights_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_default_model"):
        build_fashion(weights_dir=tmp_path)


def test_fashion_two_step_generation_shape():
    images = _generate(build_fashion())
    assert images.shape == (1, 64, 64, 3) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0


def test_caption_embeddings_match_the_pipeline():
    pipe = build_fashion(components=("text_encoder",))
    captions = ["", "a photo of a bag", "a picture of an ankle boot on a black background"]
    cached = default_model.encode_captions(captions, pipe.text_encoder)
    assert cached.shape == (3, default_model.MAX_TOKENS, 384)
    with torch.no_grad():
        ids = pipe.tokenizer(captions, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
        direct = pipe.text_encoder(ids.input_ids)[0]
    assert torch.equal(cached, direct)


@pytest.mark.slow
def test_fashion_round_trips_through_save_pretrained(tmp_path):
    pipe = build_fashion()
    pipe.save_pretrained(tmp_path / "fashion")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "fashion")
    assert type(loaded.scheduler).__name__ == "DDIMScheduler"
    assert loaded.tokenizer.model_max_length == default_model.MAX_TOKENS
    np.testing.assert_array_equal(_generate(pipe, steps=3), _generate(loaded, steps=3))
