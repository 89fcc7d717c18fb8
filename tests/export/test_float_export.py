import types

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from dgq import zoo
from export.float_export import WRAPPERS, ExportError, example_inputs, export_float
from export.iospec import read_specs, specs_from_json
from tests.tolerances import FLOAT_ONNX_MAX_REL_ERR, FP16_MAX_FILE_SIZE_RATIO, FP16_ONNX_MAX_REL_ERR

ATTR = {"unet": "unet", "text_encoder": "text_encoder", "vae_decoder": "vae"}
OPT_LEVELS = {"off": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "on": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
# Two batch sizes, and for the networks with dynamic latents two more resolutions (one non-square).
CASES = {
    "unet": [
        dict(batch=1),
        dict(batch=3),
        dict(batch=2, latent_height=8, latent_width=32),
        dict(batch=1, latent_height=28, latent_width=12),
    ],
    "text_encoder": [dict(batch=1), dict(batch=3)],
    "vae_decoder": [
        dict(batch=1),
        dict(batch=3),
        dict(batch=2, latent_height=8, latent_width=32),
        dict(batch=1, latent_height=24, latent_width=13),
    ],
}


def session(path, level="off"):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = OPT_LEVELS[level]
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def torch_reference(module, spec, inputs):
    """The wrapped float32 module on float32 copies of ``inputs``."""
    args = [inputs[n].float() if inputs[n].dtype == torch.float16 else inputs[n] for n in spec.input_names]
    with torch.no_grad():
        return WRAPPERS[spec.name](module).eval()(*args).numpy()


def rel_err(out, ref):
    return float(np.abs(out.astype(np.float32) - ref).max() / np.abs(ref).max())


def test_writes_graphs_and_iospec(exported):
    assert sorted(exported) == ["iospec", "manifest", "text_encoder", "unet", "vae_decoder"]
    specs = read_specs(exported["iospec"].parent)
    assert specs == specs_from_json(exported["iospec"].read_text())
    assert sorted(specs) == ["text_encoder", "unet", "vae_decoder"]
    assert sorted(p.name for p in exported["iospec"].parent.iterdir()) == [
        "iospec.json",
        "manifest.json",
        "scheduler",
        "text_encoder.onnx",
        "tokenizer",
        "unet.onnx",
        "vae_decoder.onnx",
    ]


@pytest.mark.parametrize("component", ["unet", "text_encoder", "vae_decoder"])
def test_graph_passes_checker_and_matches_spec(exported, component):
    onnx.checker.check_model(str(exported[component]), full_check=True)
    model = onnx.load(str(exported[component]))
    spec = specs_from_json(exported["iospec"].read_text())[component]
    assert [i.name for i in model.graph.input] == spec.input_names
    assert [o.name for o in model.graph.output] == spec.output_names
    assert model.opset_import[0].version == 17
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == list(spec.inputs[0].shape)


@pytest.mark.parametrize("level", ["off", "on"])
@pytest.mark.parametrize("component", ["unet", "text_encoder", "vae_decoder"])
def test_onnxruntime_matches_torch(tiny_pipe, exported, component, level):
    spec = specs_from_json(exported["iospec"].read_text())[component]
    sess = session(exported[component], level)
    module = getattr(tiny_pipe, ATTR[component])
    for i, dims in enumerate(CASES[component]):
        inputs = example_inputs(spec, seed=i, **dims)
        feed = {k: v.numpy() for k, v in inputs.items()}
        bound = spec.check_feed(feed)
        (out,) = sess.run(None, feed)
        assert out.shape == spec.output_shapes(bound)[spec.output_names[0]]
        assert rel_err(out, torch_reference(module, spec, inputs)) < FLOAT_ONNX_MAX_REL_ERR, dims


def test_wrappers_compute_what_the_pipeline_computes(tiny_pipe):
    """The wrappers only fix signatures: same numbers as the diffusers calls the pipeline makes."""
    g = torch.Generator().manual_seed(0)
    sample, text, latent = (
        torch.randn(2, 4, 16, 16, generator=g),
        torch.randn(2, 77, 32, generator=g),
        torch.randn(1, 4, 16, 16, generator=g),
    )
    ids = tiny_pipe.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    t = torch.tensor(981.0)
    with torch.no_grad():
        assert torch.equal(WRAPPERS["unet"](tiny_pipe.unet)(sample, t, text), tiny_pipe.unet(sample, t, text).sample)
        assert torch.equal(WRAPPERS["text_encoder"](tiny_pipe.text_encoder)(ids.int()), tiny_pipe.text_encoder(ids)[0])
        vae = tiny_pipe.vae
        assert torch.equal(WRAPPERS["vae_decoder"](vae)(latent), vae.decode(latent / vae.config.scaling_factor).sample)


def test_export_is_deterministic(tiny_pipe, exported, tmp_path):
    again = export_float(tiny_pipe, tmp_path / "again")
    for name in ("unet", "text_encoder", "vae_decoder", "iospec", "manifest"):
        assert (
            again[name].read_text(errors="replace").splitlines()
            == exported[name].read_text(errors="replace").splitlines()
        ), name


def test_external_data_when_over_threshold(tiny_pipe, tmp_path):
    out = export_float(tiny_pipe, tmp_path / "ext", components=("vae_decoder",), external_data_threshold=0)
    data = out["vae_decoder"].with_name("vae_decoder.onnx.data")
    assert data.is_file() and data.stat().st_size > out["vae_decoder"].stat().st_size
    onnx.checker.check_model(str(out["vae_decoder"]))
    spec = specs_from_json(out["iospec"].read_text())["vae_decoder"]
    inputs = example_inputs(spec)
    (img,) = session(out["vae_decoder"]).run(None, {k: v.numpy() for k, v in inputs.items()})
    assert rel_err(img, torch_reference(tiny_pipe.vae, spec, inputs)) < FLOAT_ONNX_MAX_REL_ERR


def test_external_data_export_is_deterministic(tiny_pipe, tmp_path):
    a, b = (export_float(tiny_pipe, tmp_path / n, components=("unet",), external_data_threshold=0) for n in "ab")
    for name in ("unet.onnx", "unet.onnx.data"):
        assert a["unet"].with_name(name).read_bytes() == b["unet"].with_name(name).read_bytes(), name


def test_static_size_fixes_graph_dims(tiny_pipe, tmp_path):
    out = export_float(tiny_pipe, tmp_path / "static", components=("unet",), static_size=(16, 24))
    model = onnx.load(str(out["unet"]))
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 4, 16, 24]
    spec = specs_from_json(out["iospec"].read_text())["unet"]
    inputs = example_inputs(spec, batch=2)
    (out_,) = session(out["unet"]).run(None, {k: v.numpy() for k, v in inputs.items()})
    assert rel_err(out_, torch_reference(tiny_pipe.unet, spec, inputs)) < FLOAT_ONNX_MAX_REL_ERR


def test_fp16_graphs(tiny_pipe, exported, tmp_path):
    out = export_float(tiny_pipe, tmp_path / "fp16", fp16=True)
    specs = specs_from_json(out["iospec"].read_text())
    assert specs["unet"].input("timestep").dtype == "float32"
    assert specs["unet"].input("sample").dtype == "float16"
    model = onnx.load(str(out["unet"]))
    # The sinusoidal timestep projection reads float32 all the way from the timestep input.
    producer = {o: n for n in model.graph.node for o in n.output}
    sin = next(n for n in model.graph.node if n.op_type == "Sin")
    stack, seen = [sin.input[0]], set()
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        assert not (node.op_type == "Cast" and node.attribute[0].i == onnx.TensorProto.FLOAT16), node.name
        stack.extend(node.input)
    for component in ("unet", "text_encoder", "vae_decoder"):
        onnx.checker.check_model(str(out[component]))
        spec = specs[component]
        inputs = example_inputs(spec)
        (got,) = session(out[component]).run(None, {k: v.numpy() for k, v in inputs.items()})
        assert got.dtype == np.float16
        ref = torch_reference(getattr(tiny_pipe, ATTR[component]), spec, inputs)
        assert rel_err(got, ref) < FP16_ONNX_MAX_REL_ERR, component
    # float16 weights: about half the float32 file (the tiny graph's structure is a visible share).
    assert out["unet"].stat().st_size < FP16_MAX_FILE_SIZE_RATIO * exported["unet"].stat().st_size


def test_fp16_conversion_of_external_weights_reads_them_one_at_a_time(tiny_pipe, exported, tmp_path):
    """The path a >2 GB export takes (its tracer spills the weights to files): the converter runs
    on the graph alone and each weight is converted as it is read. Same graph and bytes as
    converting the graph with its weights in memory."""
    from export.float_export import _load_external_as_fp16, _to_fp16, pipeline_specs

    spec = pipeline_specs(tiny_pipe, ["unet"], fp16=True)["unet"]
    spilled = tmp_path / "spilled.onnx"
    onnx.save_model(
        onnx.load(str(exported["unet"])), str(spilled), save_as_external_data=True, location="w.bin", size_threshold=0
    )
    inferred = tmp_path / "inferred.onnx"
    onnx.shape_inference.infer_shapes_path(str(spilled), str(inferred))
    assert any(
        t.data_location == onnx.TensorProto.EXTERNAL
        for t in onnx.load(str(inferred), load_external_data=False).graph.initializer
    )
    reference = _to_fp16(onnx.load(str(inferred)), spec)
    lean = _to_fp16(onnx.load(str(inferred), load_external_data=False), spec)
    _load_external_as_fp16(lean, tmp_path)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in lean.graph.initializer)
    assert lean.SerializeToString() == reference.SerializeToString()
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in lean.graph.initializer)


def test_missing_component_is_refused_without_output(tmp_path):
    pipe = zoo.build_pipeline("tiny", components=("unet",))
    with pytest.raises(ExportError, match=r"has no 'text_encoder'.*leave 'text_encoder' out of components"):
        export_float(pipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ExportError, match="unknown component"):
        export_float(pipe, tmp_path / "out", components=("vae",))


def test_tokenizer_without_length_refused(tiny_pipe, tmp_path):
    pipe = types.SimpleNamespace(unet=tiny_pipe.unet, tokenizer=types.SimpleNamespace(model_max_length=int(1e30)))
    with pytest.raises(ExportError, match=r"model_max_length .* unset"):
        export_float(pipe, tmp_path / "out", components=("unet",))


def test_existing_folder_needs_overwrite(tiny_pipe, exported):
    with pytest.raises(FileExistsError, match="overwrite"):
        export_float(tiny_pipe, exported["iospec"].parent, components=("vae_decoder",))


def test_two_text_towers_need_both_tokenizers(tiny_pipe, tmp_path):
    # SDXL's text encoder graph runs both towers (tests/runtime/test_text2image_xl.py); a pipeline with
    # a second tower but no second tokenizer is refused instead of exporting the first tower alone.
    sdxl_like = types.SimpleNamespace(
        unet=tiny_pipe.unet,
        text_encoder=tiny_pipe.text_encoder,
        text_encoder_2=tiny_pipe.text_encoder,
        tokenizer=tiny_pipe.tokenizer,
    )
    with pytest.raises(ExportError, match="has no tokenizer_2"):
        export_float(sdxl_like, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_float16_module_refused(tmp_path):
    pipe = zoo.build_pipeline("tiny", components=("vae",))
    pipe.vae.to(torch.float16)
    with pytest.raises(ExportError, match=r"vae_decoder has \['torch.float16'\] weights; load the pipeline in float32"):
        export_float(pipe, tmp_path / "out", components=("vae_decoder",))


def test_sdxl_shaped_unet(tmp_path):
    """text_time addition embedding (SDXL): text_embeds and time_ids inputs, numerically checked."""
    from diffusers import UNet2DConditionModel

    from dgq.zoo.builders import TINY_UNET

    torch.manual_seed(0)
    cfg = dict(
        TINY_UNET,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
    )
    unet = UNet2DConditionModel(**cfg).eval()
    pipe = types.SimpleNamespace(unet=unet, tokenizer=types.SimpleNamespace(model_max_length=77))
    out = export_float(pipe, tmp_path / "sdxl", components=("unet",), assets=False)
    spec = specs_from_json(out["iospec"].read_text())["unet"]
    assert spec.input_names == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    inputs = example_inputs(spec, batch=3)
    inputs["time_ids"] = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(3, 1)
    (got,) = session(out["unet"], "on").run(None, {k: v.numpy() for k, v in inputs.items()})
    assert rel_err(got, torch_reference(unet, spec, inputs)) < FLOAT_ONNX_MAX_REL_ERR


@pytest.mark.parametrize(
    "variant, opset",
    [
        ({}, 21),
        ({"use_linear_projection": True, "upcast_attention": True, "attention_head_dim": (2, 4, 4)}, 17),
        ({}, 18),
        ({}, 19),
        ({}, 20),
    ],
    ids=["sd15-opset21", "sd21-shaped", "opset18", "opset19", "opset20"],
)
def test_unet_variants(variant, opset, tmp_path):
    """Every supported opset (17 is the default of every other test), and SD 2.x's linear projections and
    float32-upcast attention."""
    from diffusers import UNet2DConditionModel

    from dgq.zoo.builders import TINY_UNET

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**TINY_UNET, **variant}).eval()
    pipe = types.SimpleNamespace(unet=unet, tokenizer=types.SimpleNamespace(model_max_length=77))
    out = export_float(pipe, tmp_path / "unet", opset=opset, components=("unet",))
    assert onnx.load(str(out["unet"])).opset_import[0].version == opset
    spec = specs_from_json(out["iospec"].read_text())["unet"]
    for level in OPT_LEVELS:
        inputs = example_inputs(spec, batch=3, latent_height=12)
        (got,) = session(out["unet"], level).run(None, {k: v.numpy() for k, v in inputs.items()})
        assert rel_err(got, torch_reference(unet, spec, inputs)) < FLOAT_ONNX_MAX_REL_ERR, level


def test_opsets_outside_the_supported_set_are_refused_before_tracing(tiny_pipe, tmp_path):
    import re

    from common.constants import SUPPORTED_OPSETS

    for opset in (5, 16, 22, 99):
        message = re.escape(f"opset {opset} is not supported: choose one of {list(SUPPORTED_OPSETS)}")
        with pytest.raises(ExportError, match=message):
            export_float(tiny_pipe, tmp_path / "x", opset=opset)
    assert list(tmp_path.iterdir()) == []


def test_fashion_bert_text_encoder_without_attention_mask(tmp_path):
    """The default model's BERT exports as the pipeline calls it (no attention mask), same embeddings."""
    try:
        pipe = zoo.build_pipeline("fashion", components=("text_encoder",))
    except (ImportError, FileNotFoundError, OSError) as err:
        pytest.skip(f"fashion text encoder unavailable: {err}")
    out = export_float(pipe, tmp_path / "fashion", components=("text_encoder",))
    spec = specs_from_json(out["iospec"].read_text())["text_encoder"]
    assert spec.input("input_ids").shape == ("batch", 16)
    prompts = ["a red dress", "a pair of sneakers", ""]
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="np").input_ids
    (got,) = session(out["text_encoder"], "on").run(None, {"input_ids": ids.astype(np.int32)})
    with torch.no_grad():
        ref, _ = pipe.encode_prompt(
            prompts, device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=False
        )
    assert rel_err(got, ref.numpy()) < FLOAT_ONNX_MAX_REL_ERR


def test_manifest_binds_the_folder(exported, tmp_path):
    import shutil

    from export.manifest import ManifestError, read_manifest, step_index

    folder = exported["manifest"].parent
    manifest = read_manifest(folder, verify=True)
    assert manifest["target"] == "float" and manifest["slots"] is None
    assert {"unet.onnx", "iospec.json", "tokenizer/tokenizer_config.json", "scheduler/scheduler_config.json"} <= set(
        manifest["files"]
    )
    assert step_index(manifest, 999) is None
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    with open(copy / "unet.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ManifestError, match=r"unet\.onnx does not match"):
        read_manifest(copy, verify=True)
    (copy / "unet.onnx").unlink()
    with pytest.raises(ManifestError, match="missing"):
        read_manifest(copy, verify=True)
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(tmp_path / "nope")
    assert step_index({"slots": [999.0, 500.0]}, 500) == 1
    assert step_index({"slots": [999.0, 500.0]}, 17) == 1  # uncalibrated: the nearest calibrated timestep
    assert step_index({"slots": [999.0, 500.0]}, 760) == 0


def test_fused_attention_graph_matches_torch_and_leaves_the_pipeline_as_it_was(tiny_pipe, tmp_path):
    """``fused_attention``: every attention block of the UNet is one com.microsoft.MultiHeadAttention
    (no Softmax left), the graph computes the float UNet in ONNX Runtime as closely as the plain
    export does, the manifest says so, and the pipeline keeps its own processors."""
    from export.manifest import read_manifest

    before = dict(tiny_pipe.unet.attn_processors)
    out = export_float(tiny_pipe, tmp_path / "fused", components=("unet",), fused_attention=True)
    assert all(p is before[k] for k, p in tiny_pipe.unet.attn_processors.items())
    model = onnx.load(str(out["unet"]))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MultiHeadAttention") == len(before) > 0 and "Softmax" not in ops
    assert ("com.microsoft", 1) in [(o.domain, o.version) for o in model.opset_import]
    assert read_manifest(out["manifest"].parent)["fused_attention"] is True
    spec = specs_from_json(out["iospec"].read_text())["unet"]
    for level in OPT_LEVELS:
        sess = session(out["unet"], level)
        for i, dims in enumerate(CASES["unet"]):
            inputs = example_inputs(spec, seed=i, **dims)
            (got,) = sess.run(None, {k: v.numpy() for k, v in inputs.items()})
            assert rel_err(got, torch_reference(tiny_pipe.unet, spec, inputs)) < FLOAT_ONNX_MAX_REL_ERR, dims
    with pytest.raises(ExportError, match="fused attention is for float32"):
        export_float(tiny_pipe, tmp_path / "fp16", components=("unet",), fp16=True, fused_attention=True)
    with pytest.raises(ExportError, match="components has no unet"):
        export_float(tiny_pipe, tmp_path / "text", components=("text_encoder",), fused_attention=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused"]


def test_fused_attention_refuses_processors_it_does_not_reproduce_and_restores_on_error(tiny_pipe, tmp_path):
    """Only diffusers' plain attention is fused (another processor would be traced as other numbers);
    the UNet gets its own processors back when the traced code raises."""
    from export.qdq.attention import fused_attention

    before = dict(tiny_pipe.unet.attn_processors)
    with pytest.raises(RuntimeError, match="inside"), fused_attention(tiny_pipe.unet):
        raise RuntimeError("inside")
    assert all(p is before[k] for k, p in tiny_pipe.unet.attn_processors.items())

    class Custom:
        def __call__(self, attn, hidden_states, *args, **kwargs):
            return hidden_states

    first = next(iter(before))
    tiny_pipe.unet.set_attn_processor({**before, first: Custom()})
    try:
        with pytest.raises(ExportError, match=r"plain attention only; this UNet has \['Custom'\]"):
            export_float(tiny_pipe, tmp_path / "custom", components=("unet",), fused_attention=True)
    finally:
        tiny_pipe.unet.set_attn_processor(before)
    assert not (tmp_path / "custom").exists()
