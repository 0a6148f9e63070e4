"""LoRA adapters: the same image as diffusers' load_lora_weights + set_adapters per seed,
batches split by adapter set, and no recompilation when a compiled denoiser switches."""

from __future__ import annotations

import os

import pytest
import torch
from server_testlib import max_level_diff, mean_abs_diff

from imagegen_server.engine import InvalidRequest
from imagegen_server.loading import ModelError
from imagegen_server.lora import LoraError
from imagegen_server.tiny import make_tiny_lora

# Adapter sets a request may name: one, two with their own scales, and none.
SETS = [
    [("ink", None)],
    [("ink", 0.7), ("film", -0.5)],
    [],
    [("film", 1.5)],
]


@pytest.fixture(scope="session")
def tiny_loras(tiny_models, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("loras")
    ink = make_tiny_lora(root / "ink", tiny_models["sd15"], seed=1, rank=4)
    film = make_tiny_lora(root / "film", tiny_models["sd15"], seed=2, rank=2)
    # One as a directory (diffusers' layout), one as the file itself.
    return {"ink": str(ink), "film": str(film / "pytorch_lora_weights.safetensors")}


def declared(tiny_loras) -> list[dict]:
    return [{"name": "ink", "uri": tiny_loras["ink"], "scale": 0.8},
            {"name": "film", "uri": f"file://{tiny_loras['film']}"}]


@pytest.fixture(scope="session")
def diffusers_with_loras(tiny_models, tiny_loras):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_models["sd15"], dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(tiny_loras["ink"], adapter_name="ink")
    film = tiny_loras["film"]
    pipe.load_lora_weights(os.path.dirname(film), weight_name=os.path.basename(film),
                           adapter_name="film")

    def run(runtime, params):
        if params.loras:
            pipe.enable_lora()
            names, scales = zip(*params.loras, strict=True)
            pipe.set_adapters(list(names), list(scales))
        else:
            pipe.disable_lora()
        return pipe(**runtime.steps.reference_kwargs(params)).images

    return run


def test_adapters_equal_diffusers_set_adapters(make_runtime, tiny_loras, diffusers_with_loras,
                                               reference_pipeline):
    runtime = make_runtime("sd15", loras=declared(tiny_loras), default_width=64,
                           default_height=64, channels_last=False)
    images = {}
    for i, adapters in enumerate(SETS):
        params = runtime.params("a lighthouse", seed=3, lora=adapters)
        images[i] = runtime.engine.generate(params, timeout_s=60)[0]
        expected = diffusers_with_loras(runtime, params)[0]
        assert mean_abs_diff(images[i], expected) < 1.0, adapters
    # The adapters change the picture, each set its own way; none is the base model exactly.
    assert mean_abs_diff(images[0], images[2]) > 3 and mean_abs_diff(images[1], images[0]) > 3
    base = reference_pipeline("sd15")(**runtime.steps.reference_kwargs(
        runtime.params("a lighthouse", seed=3))).images[0]
    # diffusers' arithmetic, as the exact-equality tests hold it: a pixel may round a level
    # apart where another CPU's kernels sum in another order.
    assert max_level_diff(images[2], base) <= 1 and mean_abs_diff(images[2], base) < 1e-3
    # A named adapter without a scale gets the declared one.
    assert runtime.params("x", lora=[("ink", None)]).loras == (("ink", 0.8),)


def test_batches_split_by_adapter_set(make_runtime, tiny_loras, diffusers_with_loras):
    runtime = make_runtime("sd15", loras=declared(tiny_loras), max_batch_size=4,
                           batch_window_ms=300, default_width=64, default_height=64)
    # Two requests of each set, in turn: those of one set batch together, never with
    # another set's (a mixed batch would draw some with the wrong weights).
    params = [runtime.params("a cat", seed=10 + i, lora=SETS[i // 2]) for i in range(8)]
    jobs = [runtime.engine.submit(p, timeout_s=60) for p in params]
    for p, job in zip(params, jobs, strict=True):
        got = job.future.result(60)[0]
        assert mean_abs_diff(got, diffusers_with_loras(runtime, p)[0]) < 1.0, p.loras
    sample = runtime.metrics.registry.get_sample_value
    requests = sample("imagegen_stage_batch_size_sum", {"stage": "denoise"})
    assert requests > sample("imagegen_stage_batch_size_count", {"stage": "denoise"})


def test_a_switch_that_fails_part_way_is_written_whole_at_the_next_batch(make_runtime,
                                                                        tiny_loras):
    from imagegen_server.lora import Factors

    runtime = make_runtime("sd15", loras=declared(tiny_loras), warmup=False,
                           default_width=64, default_height=64)
    ink = runtime.params("a lighthouse", seed=3, lora=SETS[0])
    (want,) = runtime.engine.generate(ink, timeout_s=60)
    # The film adapter's factors of one module in the middle cannot be written (as a device
    # out of memory would fail it): the modules before it are written with film's by then.
    slot = runtime.steps.adapters
    film = slot.factors["film"]
    modules = [m for m in slot.layers if m in film]
    broken = modules[len(modules) // 2]
    film[broken] = Factors(film[broken].a, film[broken].b[:0])
    with pytest.raises(RuntimeError):
        runtime.engine.generate(runtime.params("x", seed=4, lora=SETS[1]), timeout_s=60)
    # The slot named no set meanwhile: ink is written again, whole.
    (got,) = runtime.engine.generate(ink, timeout_s=60)
    assert mean_abs_diff(got, want) == 0.0


@pytest.mark.parametrize(
    ("lora", "field"),
    [([("sketch", None)], "lora.0.name"), ([("ink", 1.0), ("ink", 0.5)], "lora.1.name"),
     ([("film", 11.0)], "lora.0.scale")],
)
def test_bad_adapter_requests_are_refused_before_device_work(make_runtime, tiny_loras, lora,
                                                             field):
    runtime = make_runtime("sd15", loras=declared(tiny_loras), warmup=False)
    with pytest.raises(InvalidRequest) as caught:
        runtime.engine.submit(runtime.params("x", lora=lora))
    assert caught.value.field == field
    assert runtime.engine.in_flight == 0


def test_a_service_without_adapters_refuses_them(make_runtime):
    runtime = make_runtime("sd15", warmup=False)
    with pytest.raises(InvalidRequest, match="none are declared"):
        runtime.engine.submit(runtime.params("x", lora=[("ink", None)]))


def test_adapters_that_cannot_be_served_stop_the_start(make_runtime, tiny_models, tmp_path):
    with pytest.raises(ModelError, match="neither a .safetensors file"):
        make_runtime("sd15", loras=[{"name": "gone", "uri": str(tmp_path)}])
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not safetensors")
    with pytest.raises(LoraError, match="'broken'"):
        make_runtime("sd15", loras=[{"name": "broken", "uri": str(broken)}])
    # Biases on B would be dropped by the slot, so the image would not be the adapter's.
    biased = make_tiny_lora(tmp_path / "biased", tiny_models["sd15"], seed=2, bias=True)
    with pytest.raises(LoraError, match="'biased' has biases"):
        make_runtime("sd15", loras=[{"name": "biased", "uri": str(biased)}])


@pytest.mark.slow
def test_switching_adapters_on_a_compiled_denoiser_does_not_recompile(
    make_runtime, tiny_loras, diffusers_with_loras, compile_cache
):
    from torch._dynamo.utils import counters

    runtime = make_runtime("sd15", loras=declared(tiny_loras), compile_enabled=True,
                           compile_mode="default", compile_regional=True,
                           compile_cache_dir=compile_cache, channels_last=False,
                           default_width=64, default_height=64)
    assert runtime.report.compiled
    # Warm-up compiled with no adapter; one pass with adapters compiles anything left.
    runtime.engine.generate(runtime.params("x", seed=1, lora=SETS[0]), timeout_s=300)
    # Every graph dynamo makes counts here, a recompile too (a changed Python attribute the
    # graph guards on, such as peft's scaling, adds one). A start that found its compiled
    # code in the cache (compiled_artifacts.py) traced nothing at all.
    graphs = counters["stats"]["unique_graphs"]
    for adapters in SETS * 2:
        params = runtime.params("a lighthouse", seed=3, lora=adapters)
        got = runtime.engine.generate(params, timeout_s=300)[0]
        assert mean_abs_diff(got, diffusers_with_loras(runtime, params)[0]) < 1.0, adapters
    assert counters["stats"]["unique_graphs"] == graphs


def test_openai_client_names_adapters_on_generations_and_edits(
    make_runtime, serve_live, tiny_loras, diffusers_with_loras
):
    import base64
    import io
    import json

    import openai
    from PIL import Image
    from server_testlib import source_image

    runtime = make_runtime("sd15", loras=declared(tiny_loras), default_width=64,
                           default_height=64)
    client = openai.OpenAI(base_url=serve_live(runtime) + "/v1", api_key="-", max_retries=0, timeout=120)
    lora = [{"name": "ink"}, {"name": "film", "scale": -0.5}]
    result = client.images.generate(prompt="a lighthouse", size="64x64",
                                    extra_body={"seed": 3, "lora": lora})
    png = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    # The adapters are part of how the image was made, so its record names them.
    assert json.loads(png.text["parameters"])["lora"] == [{"name": "ink", "scale": 0.8},
                                                          {"name": "film", "scale": -0.5}]
    got = png.convert("RGB")
    params = runtime.params("a lighthouse", seed=3, lora=[("ink", None), ("film", -0.5)])
    assert mean_abs_diff(got, diffusers_with_loras(runtime, params)[0]) < 1.0
    buffer = io.BytesIO()
    source_image().save(buffer, format="PNG")
    result = client.images.edit(image=("s.png", buffer.getvalue(), "image/png"), prompt="ink",
                                extra_body={"seed": 4, "lora": '[{"name": "ink"}]'})
    assert len(result.data) == 1
    # A list as on generations: the client writes every lora[][name], then every
    # lora[][scale], so the k-th scale is the k-th adapter's.
    upload = ("s.png", buffer.getvalue(), "image/png")
    scaled = [{"name": "ink", "scale": 0.5}, {"name": "film", "scale": -0.5}]
    result = client.images.edit(image=upload, prompt="ink", extra_body={"seed": 4, "lora": scaled})
    png = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert json.loads(png.text["parameters"])["lora"] == scaled
    # A scale for some adapters only cannot be paired: refused, not guessed.
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(image=upload, prompt="x", extra_body={"lora": lora})
    assert caught.value.body["param"] == "lora.1.scale"
    for extra, param in (({"lora": [{"name": "sketch"}]}, "lora.0.name"),
                         ({"lora": [{"name": "ink", "scale": "much"}]}, "lora.0.scale"),
                         ({"styles": [{"name": "ink"}]}, "styles[][name]")):
        with pytest.raises(openai.BadRequestError) as caught:
            client.images.edit(image=upload, prompt="x", extra_body=extra)
        assert caught.value.body["param"] == param
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="x", extra_body={"lora": [{"name": "sketch"}]})
    assert caught.value.body["param"] == "lora.0.name"
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="x", extra_body={"lora": [{"name": "ink", "weight": 1}]})
    assert caught.value.body["param"] == "lora.0.weight"


def test_a_flux_lora_on_the_final_projection_reaches_nothing_else(make_runtime, tiny_models,
                                                                  tmp_path):
    # Kohya's final_layer is Flux's root proj_out; each single block has a proj_out too, which
    # a slot matched by name suffix would also carry, with random weights.
    lora = make_tiny_lora(tmp_path / "final", tiny_models["flux"], seed=4, rank=2,
                          targets="^proj_out$")
    small = {"warmup": False, "default_width": 64, "default_height": 64}
    runtime = make_runtime("flux", loras=[{"name": "final", "uri": str(lora)}], **small)
    assert list(runtime.steps.adapters.layers) == ["proj_out"]
    plain = make_runtime("flux", **small)
    without = runtime.engine.generate(runtime.params("a boat", seed=5), timeout_s=60)[0]
    base = plain.engine.generate(plain.params("a boat", seed=5), timeout_s=60)[0]
    assert max_level_diff(without, base) <= 1 and mean_abs_diff(without, base) < 1e-3
    adapted = runtime.engine.generate(
        runtime.params("a boat", seed=5, lora=[("final", 1.0)]), timeout_s=60)[0]
    assert mean_abs_diff(adapted, base) > 0


def test_the_compile_key_holds_the_slots_shape_not_only_the_adapters_uri(make_runtime,
                                                                         tiny_models, tmp_path):
    """The slot's rank and modules are compiled in, and come from the adapters' files, which
    may change under the same URI (a hub repository's new revision): another key, so the
    old compiled code is not loaded for it."""
    import shutil

    from imagegen_server.compiled_artifacts import artifact_key, key_parts

    path = tmp_path / "ink"
    declared = [{"name": "ink", "uri": str(path)}]
    keys = []
    for rank in (4, 2):
        shutil.rmtree(path, ignore_errors=True)
        make_tiny_lora(path, tiny_models["sd15"], seed=1, rank=rank)
        runtime = make_runtime("sd15", warmup=False, loras=declared)
        parts = key_parts(runtime.steps, runtime.settings, runtime.model.dtype)
        assert parts["lora_slot"]["rank"] == rank and parts["lora_slot"]["modules"]
        keys.append(artifact_key(parts))
    assert keys[0] != keys[1]
