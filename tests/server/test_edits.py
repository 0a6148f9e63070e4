"""Image edits through the stages against diffusers' img2img and inpainting pipelines.

The references are built from the very components the server loaded
(``StableDiffusionImg2ImgPipeline(**pipe.components)``), so the same seed must give the
same image: one request alone runs diffusers' arithmetic, batched ones agree to well under
one 8-bit level.
"""

from __future__ import annotations

import numpy as np
import pytest
from server_testlib import MODES, left_half_mask, max_level_diff, mean_abs_diff, source_image

from imagegen_server.engine import InvalidRequest
from imagegen_server.request import EditInput

# diffusers warns when one image serves n > 1 results; it duplicates it, as the server does.
pytestmark = pytest.mark.filterwarnings("ignore:You have passed 2 text prompts:FutureWarning")

CASES = [
    {"prompt": "a red cat", "seed": 1, "strength": 0.6},
    {"prompt": "a blue house", "seed": 2, "strength": 1.0, "guidance_scale": 1.0, "n": 2},
    {"prompt": "a green tree", "seed": 3, "strength": 0.75, "mask": True},
    {"prompt": "a boat", "seed": 4, "strength": 1.0, "mask": True, "negative_prompt": "fog"},
]


def edit_params(runtime, case: dict):
    case = dict(case)
    edit = EditInput(source_image(), case.pop("strength"),
                     left_half_mask() if case.pop("mask", False) else None)
    return runtime.params(case.pop("prompt"), edit=edit, **case)


@pytest.mark.parametrize(("family", "mode"),
                         [("sd15", "Pipelined"), ("sd15", "Stacked"), ("sd15", "Step"),
                          ("sdxl", "Pipelined")])
def test_single_edits_equal_diffusers_exactly(make_runtime, references, family, mode):
    runtime = make_runtime(family, **MODES[mode], default_width=64, default_height=64,
                           channels_last=False)
    for case in CASES:
        params = edit_params(runtime, case)
        images = runtime.engine.generate(params, timeout_s=60)
        expected = references(runtime, params, family)
        assert len(images) == len(expected) == params.n
        # One request alone runs diffusers' arithmetic: the same pixels, but for a few
        # rounded a level apart where a CPU's kernels sum in another order (one pixel at
        # some instruction-set levels here; another vendor's kernels may differ in more).
        for got, want in zip(images, expected, strict=True):
            assert max_level_diff(got, want) <= 1, case
            assert mean_abs_diff(got, want) < 1e-2, case


@pytest.mark.parametrize("mode", ["Pipelined", "Step"])
def test_batched_edits_equal_diffusers(make_runtime, references, mode):
    runtime = make_runtime("sd15", **MODES[mode], max_batch_size=4, batch_window_ms=300,
                           default_width=64, default_height=64)
    # Request-level batches share a strength; step-level ones mix them (and text-to-image).
    cases = [dict(c, strength=0.75) for c in CASES] if mode == "Pipelined" else CASES
    params = [edit_params(runtime, c) for c in cases]
    if mode == "Step":
        params.append(runtime.params("no image at all", seed=9))
    jobs = [runtime.engine.submit(p, timeout_s=60) for p in params]
    for p, job in zip(params, jobs, strict=True):
        images = job.future.result(60)
        diffs = [mean_abs_diff(a, b) for a, b in zip(images, references(runtime, p), strict=True)]
        assert max(diffs) < 1.0, diffs
    # And they were batched: more requests (per step, step-level) than denoiser batches.
    sample = runtime.metrics.registry.get_sample_value
    stage = {"stage": "denoise"}
    requests = sample("imagegen_stage_batch_size_sum", stage)
    assert requests > sample("imagegen_stage_batch_size_count", stage), requests


def test_inpainting_repaints_only_under_the_mask(make_runtime):
    runtime = make_runtime("sd15", default_width=64, default_height=64)
    # Same seed, other prompts: the same image latents and noise, another denoiser output.
    a, b = (np.asarray(runtime.engine.generate(edit_params(runtime, dict(CASES[2], prompt=text)),
                                               timeout_s=60)[0], dtype=np.float64)
            for text in ("a green tree", "a purple sky"))
    repainted = np.abs(a[:, :24] - b[:, :24]).mean()
    kept = np.abs(a[:, 40:] - b[:, 40:]).mean()
    # The kept side ends as the image's own latents; only the decoder's reach across the
    # mask's edge may differ there.
    assert repainted > 1.0 and kept < repainted / 4, (kept, repainted)


@pytest.mark.parametrize(
    ("strength", "steps", "field"),
    [(0.0, 3, "strength"), (1.5, 3, "strength"), (0.2, 3, "strength")],
)
def test_edits_out_of_range_are_refused_before_device_work(make_runtime, strength, steps, field):
    runtime = make_runtime("sd15")
    params = runtime.params("x", steps=steps, edit=EditInput(source_image(), strength))
    with pytest.raises(InvalidRequest) as caught:
        runtime.engine.submit(params)
    assert caught.value.field == field
    assert runtime.engine.in_flight == 0


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_families_without_edits_refuse_them(make_runtime, family):
    runtime = make_runtime(family, warmup=False)
    params = runtime.params("x", width=64, height=64, edit=EditInput(source_image(), 0.5))
    with pytest.raises(InvalidRequest, match="not supported") as caught:
        runtime.engine.submit(params)
    assert caught.value.field == "image"
