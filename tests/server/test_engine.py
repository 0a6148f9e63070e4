"""The stage pipeline against diffusers' own pipeline: same seed, same image, any batching."""

from __future__ import annotations

import gc
import math
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from server_testlib import (
    FAMILIES,
    MODES,
    STEPS,
    Gate,
    assert_same_arithmetic,
    count_calls,
    mean_abs_diff,
    wait_until,
)

from imagegen_server import engine as engine_module
from imagegen_server.engine import (
    EngineClosedError,
    InvalidRequest,
    QueueFullError,
    check_sizes,
)
from imagegen_server.metrics import ServerMetrics
from imagegen_server.request import GenerationParams, Job, JobTimeout, ShutdownError
from imagegen_server.stages import Stage

# Requests that exercise the branches: guidance on/off, negative prompt, several images.
CASES = [
    {"prompt": "a red cat", "seed": 1},
    {"prompt": "a blue house", "seed": 2, "guidance_scale": 1.0},
    {"prompt": "a green tree", "seed": 3, "negative_prompt": "blurry", "n": 2},
]


def assert_matches_reference(images, reference_images) -> list[float]:
    assert len(images) == len(reference_images)
    diffs = [mean_abs_diff(a, b) for a, b in zip(images, reference_images, strict=True)]
    # Mean absolute difference under 1/255 of the range (1.0 in 8-bit units).
    assert max(diffs) < 1.0, diffs
    return diffs


def reference(pipe, runtime, params: GenerationParams):
    return pipe(**runtime.steps.reference_kwargs(params)).images


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_single_requests_equal_diffusers_exactly(make_runtime, reference_pipeline, family, mode):
    # channels_last off: NHWC convolutions round differently (a pixel off by one in 8 bits).
    runtime = make_runtime(
        family, **MODES[mode], default_width=64, default_height=64, channels_last=False
    )
    pipe = reference_pipeline(family)
    exact = 0
    for case in CASES:
        params = runtime.params(**case)
        images = runtime.engine.generate(params, timeout_s=60)
        diffs = assert_matches_reference(images, reference(pipe, runtime, params))
        exact += sum(d == 0.0 for d in diffs)
        assert np.asarray(images[0]).std() > 0  # a real image, not a constant
    # One request at a time runs the very same arithmetic as diffusers: identical pixels.
    assert exact == 4


def test_a_sigterm_while_loading_keeps_the_server_from_turning_ready(tiny_models):
    from server_testlib import tiny_settings

    from imagegen_server.runtime import ModelRuntime

    runtime = ModelRuntime(tiny_settings(tiny_models["sd15"], warmup=False))
    try:
        assert runtime.drain(5.0)  # the signal comes before the model is there
        runtime.load()
        assert not runtime.ready
        assert runtime.metrics.ready._value.get() == 0  # what /metrics reads
    finally:
        runtime.close(timeout=30)


def test_different_seeds_give_different_images(make_runtime):
    runtime = make_runtime("sd15")
    a = runtime.engine.generate(runtime.params("same prompt", seed=1), timeout_s=60)[0]
    b = runtime.engine.generate(runtime.params("same prompt", seed=2), timeout_s=60)[0]
    assert mean_abs_diff(a, b) > 1.0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_batched_requests_equal_diffusers(make_runtime, reference_pipeline, family, mode):
    # A long window so that everything submitted together lands in one batch (with step-level
    # batching: the encode stage's batch reaches the denoise stage together), and room for all
    # five images.
    runtime = make_runtime(
        family,
        **MODES[mode],
        max_batch_size=5,
        batch_window_ms=300,
        default_width=64,
        default_height=64,
    )
    pipe = reference_pipeline(family)
    params = [runtime.params(**case) for case in CASES] + [runtime.params("a fourth", seed=4)]
    jobs = [runtime.engine.submit(p, timeout_s=60) for p in params]
    results = [job.future.result(60) for job in jobs]
    for p, images in zip(params, results, strict=True):
        assert_matches_reference(images, reference(pipe, runtime, p))
    denoise_stage = "stacked" if mode == "Stacked" else "denoise"
    count = _sample(runtime, "imagegen_stage_batch_size_count", denoise_stage)
    total = _sample(runtime, "imagegen_stage_batch_size_sum", denoise_stage)
    if mode == "Step":
        # Observed per step: more than two requests per denoiser call on average.
        assert total / count > 2, (count, total)
    else:
        # 4 requests in at most 2 batches means real batching (warm-up is not counted).
        assert total == 4 and count <= 2, (count, total)


@pytest.mark.parametrize("mode", ["Pipelined", "Step"])
def test_sixteen_concurrent_requests_have_no_cross_talk(make_runtime, reference_pipeline, mode):
    runtime = make_runtime("sd15", **MODES[mode], max_batch_size=4, batch_window_ms=20)
    pipe = reference_pipeline("sd15")
    # Mixed sizes and step counts, so batches split into groups as well.
    params = [
        runtime.params(
            f"prompt number {i}",
            seed=100 + i,
            width=64 if i % 3 else 96,
            steps=STEPS if i % 4 else STEPS + 1,
            guidance_scale=[1.0, 4.0, 7.5][i % 3],
        )
        for i in range(16)
    ]
    start_together = threading.Barrier(len(params))

    def call(p):
        start_together.wait(timeout=30)
        return runtime.engine.generate(p, timeout_s=120)

    with ThreadPoolExecutor(max_workers=len(params)) as pool:
        results = list(pool.map(call, params))
    for p, images in zip(params, results, strict=True):
        assert images[0].size == (p.width, p.height)
        assert_matches_reference(images, reference(pipe, runtime, p))
    # Cross talk could only happen in a batch: there were some (more requests than calls).
    requests = _sample(runtime, "imagegen_stage_batch_size_sum", "denoise")
    assert requests > _sample(runtime, "imagegen_stage_batch_size_count", "denoise")


def _sample(runtime, name: str, stage: str) -> float:
    for family in runtime.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name and sample.labels.get("stage") == stage:
                return sample.value
    raise AssertionError(f"no sample {name}{{stage={stage}}}")


def test_stacked_mode_times_each_step_of_its_batches(make_runtime):
    runtime = make_runtime("sd15", **MODES["Stacked"])
    runtime.engine.generate(runtime.params("timed", seed=1), timeout_s=60)
    for stage in ("stacked", "encode", "denoise", "decode"):
        assert _sample(runtime, "imagegen_stage_duration_seconds_count", stage) == 1, stage
        assert _sample(runtime, "imagegen_stage_duration_seconds_sum", stage) > 0, stage


def test_full_queue_is_refused_at_once(make_runtime):
    runtime = make_runtime("sd15", queue_capacity=2, max_batch_size=1)
    gate = Gate(runtime)  # the first request holds the device: both are still in flight
    try:
        # Two requests at the default size and steps: two units of work, all there is room for.
        slow = [runtime.engine.submit(runtime.params("slow", seed=i)) for i in range(2)]
        with pytest.raises(QueueFullError) as info:
            runtime.engine.submit(runtime.params("one too many", seed=3))
    finally:
        gate.close()
    assert info.value.retry_after_s >= 1
    for job in slow:
        assert len(job.future.result(120)) == 1
    # Capacity comes back once the work is done.
    assert runtime.engine.generate(runtime.params("again", seed=4), timeout_s=60)


def test_deadline_passed_in_queue_fails_the_job(make_runtime):
    runtime = make_runtime("sd15", stage_mode="Stacked", max_batch_size=1)
    slow = runtime.engine.submit(runtime.params("slow", seed=1, steps=40))
    late = runtime.engine.submit(runtime.params("late", seed=2), timeout_s=0.001)
    with pytest.raises(JobTimeout):
        late.future.result(120)
    assert slow.future.result(120)


def test_close_drains_accepted_work_then_refuses(make_runtime):
    runtime = make_runtime("sd15", max_batch_size=2)
    jobs = [runtime.engine.submit(runtime.params(f"p{i}", seed=i, steps=20)) for i in range(4)]
    assert runtime.engine.close(timeout=120) is True
    assert all(job.future.done() and len(job.future.result()) == 1 for job in jobs)
    with pytest.raises(EngineClosedError):
        runtime.engine.submit(runtime.params("after close", seed=9))


@pytest.mark.parametrize("mode", MODES)
def test_close_answers_what_did_not_finish_by_its_deadline(make_runtime, mode):
    # A denoiser call held past close's deadline: the request is answered with ShutdownError
    # (503) at the deadline, not left waiting, and leaves once the held step returns.
    runtime = make_runtime("sd15", **MODES[mode], warmup=False)
    gate = Gate(runtime)
    job = runtime.engine.submit(runtime.params("held", seed=1))
    assert gate.entered.wait(30)
    closed = []
    closing = threading.Thread(target=lambda: closed.append(runtime.engine.close(timeout=0.4)))
    closing.start()
    try:
        assert isinstance(job.future.exception(timeout=10), ShutdownError)
    finally:
        gate.close()
        closing.join(30)
    assert closed == [False]
    assert job.released and runtime.engine.in_flight == 0


def test_without_max_pixels_a_listed_size_above_the_native_one_is_admitted(make_runtime):
    """The sizes a service names are admitted; maxPixels unset bounds only the others."""
    runtime = make_runtime("sd15", warmup=False, max_pixels=None, allowed_sizes=["128x96"])
    assert runtime.steps.native_size == (64, 64)
    base = runtime.params("listed", seed=1)
    runtime.engine.submit(GenerationParams(**{**base.__dict__, "width": 128, "height": 96}),
                          timeout_s=60).future.result(60)
    with pytest.raises(InvalidRequest) as info:  # not listed: the list is all there is
        runtime.engine.submit(GenerationParams(**{**base.__dict__, "width": 96, "height": 96}))
    assert info.value.field == "size"


def test_a_drain_waits_for_a_request_holding_a_place_and_serves_it(make_runtime):
    """An edit whose upload is decoding when SIGTERM comes was accepted: the drain waits
    for it and it is served; past the drain's deadline it is refused as any other."""
    runtime = make_runtime("sd15", warmup=False)
    drained = []
    with runtime.engine.reserve() as place:
        draining = threading.Thread(target=lambda: drained.append(runtime.engine.drain(60)))
        draining.start()
        time.sleep(0.3)
        assert drained == [] and not runtime.engine.accepting  # closed, and waiting for it
        job = runtime.engine.submit(runtime.params("decoded", seed=1), place=place)
    assert len(job.future.result(60)) == 1
    draining.join(60)
    assert drained == [True]

    late = make_runtime("sd15", warmup=False)
    with late.engine.reserve() as place:
        assert late.engine.drain(0.2) is False  # the place was never handed over
        with pytest.raises(EngineClosedError):
            late.engine.submit(late.params("too late", seed=1), place=place)


def test_close_after_a_sigterm_drain_keeps_to_what_is_left_of_its_deadline(make_runtime):
    """The pod's grace period holds one drain: the app's close after it does not start a
    second one with the full timeout."""
    runtime = make_runtime("sd15", warmup=False)
    asked = []
    close = runtime.engine.close
    runtime.engine.close = lambda timeout=None: asked.append(timeout) or close(timeout)
    assert runtime.drain(0.2)
    time.sleep(0.3)
    assert runtime.close(timeout=120)
    assert asked == [0.0]


def test_close_after_a_drain_that_cancelled_work_says_so(make_runtime):
    # The log line "engine stopped: drained" must not follow a drain that cut requests short.
    runtime = make_runtime("sd15", warmup=False)
    gate = Gate(runtime)
    job = runtime.engine.submit(runtime.params("held", seed=1))
    assert gate.entered.wait(30)
    try:
        assert runtime.drain(0.3) is False
        assert isinstance(job.future.exception(timeout=10), ShutdownError)
    finally:
        gate.close()
    assert runtime.close(timeout=30) is False


def test_a_job_handed_to_a_stopped_stage_fails_at_once():
    # What a stage that outlasted its stop's timeout hands on later: answered, not queued
    # behind a thread that has ended.
    def stage() -> Stage:
        return Stage("decode", lambda jobs: [[] for _ in jobs], lambda job: 0, max_batch_size=1,
                     batch_window_s=0, capacity=4, metrics=ServerMetrics(),
                     device=torch.device("cpu"), on_output=lambda job, images: job.finish(images))

    started, never_started = stage(), stage()
    started.start()
    served = Job(GenerationParams("before", 64, 64, 2, 0.0, seed=1))
    started.put(served)
    started.stop(timeout=10)
    never_started.stop(timeout=10)
    assert served.future.result(0) == []  # what was queued before the stop still ran
    for stopped in (started, never_started):
        late = Job(GenerationParams("late", 64, 64, 2, 0.0, seed=2))
        stopped.put(late)
        assert isinstance(late.future.exception(0), ShutdownError) and late.released
        assert stopped.queue.empty()


def test_a_stage_batches_up_to_max_batch_size_images_and_runs_a_larger_request_alone():
    # A request of n images is n rows of the step's batch: the batch's memory is bounded by
    # images, which is what the operator's planner sizes a slot for.
    batches: list[list[int]] = []

    def step(jobs):
        batches.append([job.params.n for job in jobs])
        return [[] for _ in jobs]

    stage = Stage("denoise", step, lambda job: 0, max_batch_size=4, batch_window_s=0.2,
                  capacity=8, metrics=ServerMetrics(), device=torch.device("cpu"),
                  on_output=lambda job, images: job.finish(images))
    jobs = [Job(GenerationParams("p", 64, 64, 2, 0.0, seed=i, n=n))
            for i, n in enumerate((1, 2, 2, 6, 1))]
    for job in jobs:  # all queued before the thread looks: what it collects is decided here
        stage.put(job)
    stage.start()
    for job in jobs:
        job.future.result(10)
    stage.stop(timeout=10)
    # In arrival order: a request whose images do not fit starts the next batch.
    assert batches == [[1, 2], [2], [6], [1]]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"width": 60}, "size"),
        ({"height": 4104}, "size"),
        ({"width": 68}, "size"),
        ({"n": 5}, "n"),
        ({"steps": 0}, "steps"),
        ({"prompt": "x" * 2001}, "prompt"),
        ({"negative_prompt": "x" * 2001}, "negative_prompt"),
    ],
)
def test_engine_checks_requests_before_device_work(make_runtime, change, field):
    runtime = make_runtime("sd15", warmup=False)
    base = runtime.params("ok", seed=1)
    params = GenerationParams(**{**base.__dict__, **change})
    with pytest.raises(InvalidRequest) as info:
        runtime.engine.submit(params)
    assert info.value.field == field
    assert runtime.engine.in_flight == 0


def test_sd3_sizes_are_whole_transformer_patches(make_runtime):
    """SD3's transformer reads latents in 2x2 patches: with its VAE's factor of 8, a size
    must be a multiple of 16 (a 520-pixel side would fail inside the denoiser). A server
    whose default or listed sizes no request could get does not start."""
    runtime = make_runtime("sd3", warmup=False)
    # The real model's factor and patch (the tiny one has 2 and 1).
    runtime.steps.vae_scale_factor, runtime.steps.pipeline.patch_size = 8, 2
    base = runtime.params("ok", seed=1)
    params = GenerationParams(**{**base.__dict__, "width": 520, "height": 512})
    with pytest.raises(InvalidRequest, match="multiple of 16") as info:
        runtime.engine.submit(params)
    assert info.value.field == "size"
    # A server whose default or listed sizes are not is refused at start, not per request.
    settings = runtime.settings.model_copy(update={"max_pixels": 512 * 512})
    check_sizes(runtime.steps, settings.model_copy(update={"allowed_sizes": ["512x512"]}))
    for update in ({"default_width": 520}, {"allowed_sizes": ["512x520"]},
                   {"allowed_sizes": ["512x512"], "max_pixels": 256 * 512}):
        with pytest.raises(InvalidRequest, match="spec.pipeline.defaults or spec.pipeline.limits"):
            check_sizes(runtime.steps, settings.model_copy(update=update))
    # No default named, and the model's native size above maxPixels: every request without a
    # size would be refused, after a warm-up that compiled it.
    native = math.prod(runtime.steps.native_size)
    with pytest.raises(InvalidRequest, match="the model's native size where no default is set"):
        check_sizes(runtime.steps, settings.model_copy(update={
            "default_width": None, "default_height": None, "max_pixels": native - 1}))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_deadline_drops_the_job_between_denoising_steps(make_runtime, family):
    runtime = make_runtime(family, max_batch_size=2, warmup=False, max_steps=1000)
    denoiser = getattr(runtime.steps.pipeline, "unet", None) or runtime.steps.pipeline.transformer
    calls = count_calls(denoiser)
    # A deadline well past the text encoder's first call on a busy 2-core runner, and steps
    # of at least 10 ms each, so no CPU runs all 1000 (10 s) by then.
    slowed = denoiser.register_forward_pre_hook(lambda *_: time.sleep(0.01))
    big = runtime.params("large", width=128, height=128, steps=1000, seed=1)
    job = runtime.engine.submit(big, timeout_s=3.0)
    try:
        with pytest.raises(JobTimeout, match=r"at denoising step (\d+)") as info:
            job.future.result(60)
    finally:
        slowed.remove()
    dropped_at = int(info.value.args[0].rsplit(" ", 1)[1])
    assert 0 < dropped_at < 1000 and calls() == dropped_at  # not one step more
    assert runtime.engine.in_flight == 0  # its slot is free again
    # A small request right after is served (how fast: bench/, not here).
    small = runtime.params("small", width=64, height=64, steps=2, seed=2)
    assert len(runtime.engine.generate(small, timeout_s=60)) == 1


@pytest.mark.parametrize("mode", MODES)
def test_a_cancelled_job_leaves_its_batch_mates_alone(make_runtime, reference_pipeline, mode):
    # Two requests denoised in one batch; one is cancelled mid-loop, the other finishes with
    # the same pixels as diffusers.
    runtime = make_runtime("sd15", **MODES[mode], max_batch_size=2, batch_window_ms=300,
                           warmup=False)
    keep = runtime.params("keep", steps=40, seed=5)
    drop = runtime.params("drop", steps=40, seed=6)
    rows: list[int] = []
    runtime.steps.pipeline.unet.register_forward_pre_hook(
        lambda _, args: rows.append(args[0].shape[0]))
    gate = Gate(runtime, at=5)  # held in the loop, so the cancel lands mid-batch
    try:
        kept, dropped = runtime.engine.submit(keep, 60), runtime.engine.submit(drop, 60)
        assert gate.entered.wait(60)
        each = 2 if keep.guidance_scale > 1 else 1  # a row with and one without the prompt
        assert rows[-1] == 2 * each  # both in the loop
        dropped.future.cancel()  # what the HTTP layer does when a client goes away
    finally:
        gate.close()
    images = kept.future.result(60)
    assert dropped.released
    assert rows[-1] == each, rows  # dropped mid-loop: the batch went on without it
    assert_matches_reference(images, reference(reference_pipeline("sd15"), runtime, keep))
    assert runtime.engine.in_flight == 0


@pytest.mark.parametrize("mode", MODES)
def test_requests_that_leave_while_queued_give_their_slots_back_at_once(make_runtime, mode):
    # Room for three; one runs (held mid-denoise), two wait behind it and their callers leave.
    runtime = make_runtime("sd15", **MODES[mode], queue_capacity=3, max_batch_size=1,
                           batch_window_ms=1, warmup=False)
    engine = runtime.engine
    gate = Gate(runtime)
    try:
        running = engine.submit(runtime.params("running", seed=1), timeout_s=60)
        assert gate.entered.wait(30)
        queued = [engine.submit(runtime.params(f"queued {i}", seed=2 + i), timeout_s=60)
                  for i in range(2)]
        held = engine.stages[1] if len(engine.stages) > 1 else engine.stages[0]
        wait_until(lambda: held.depth() == 2)  # both in front of the held stage
        with pytest.raises(QueueFullError):
            engine.submit(runtime.params("one too many", seed=9))
        for job in queued:
            job.future.cancel()  # what the HTTP layer does when a client goes away
        # Their slots are free before the running batch has ended, and nothing waits.
        assert all(job.released for job in queued)
        assert engine.in_flight == 1 and sum(stage.depth() for stage in engine.stages) == 0
        late = engine.submit(runtime.params("late", seed=7), timeout_s=60)
    finally:
        gate.close()
    assert len(running.future.result(60)) == len(late.future.result(60)) == 1
    wait_until(lambda: engine.in_flight == 0)


def test_a_request_that_leaves_while_a_stage_holds_it_gives_its_slot_back_when_handed_on(
        make_runtime):
    runtime = make_runtime("sd15", queue_capacity=3, max_batch_size=1, batch_window_ms=1,
                           warmup=False)
    engine = runtime.engine
    encoding, go_on = threading.Event(), threading.Event()

    def hold_the_encoder(*_):
        encoding.set()
        assert go_on.wait(60)

    gate = Gate(runtime)  # the running request, held mid-denoise
    try:
        running = engine.submit(runtime.params("running", seed=1), timeout_s=60)
        assert gate.entered.wait(30)
        hook = runtime.steps.pipeline.text_encoder.register_forward_pre_hook(hold_the_encoder)
        leaving = engine.submit(runtime.params("leaving", seed=2), timeout_s=60)
        assert encoding.wait(30)
        leaving.future.cancel()  # while the encode stage has it in hand: in no queue
        hook.remove()
        go_on.set()
        # Handed on to the denoise queue, it is taken out there: its slot is free before
        # the running batch has ended.
        wait_until(lambda: leaving.released, timeout_s=20)
        assert engine.in_flight == 1 and engine.stages[1].depth() == 0
    finally:
        go_on.set()
        gate.close()
    assert len(running.future.result(60)) == 1


def test_admission_counts_work_not_requests(make_runtime):
    # Room for 4 units of work: a unit is one request at the default size (64x64) and steps.
    runtime = make_runtime("sd15", queue_capacity=4, max_batch_size=1, warmup=False)
    engine = runtime.engine
    big = runtime.params("big", width=128, height=128, steps=4 * STEPS, seed=1)  # 16 units
    small = [runtime.params(f"small {i}", seed=10 + i) for i in range(5)]  # 1 unit each

    # An idle engine takes any one request, however costly.
    gate = Gate(runtime)  # held on the device, so still in flight below
    try:
        job = engine.submit(big, timeout_s=120)
        assert engine.work_in_flight == pytest.approx(16)
        # By count there would be room for three more; by work there is none.
        with pytest.raises(QueueFullError) as refused:
            engine.submit(small[0])
    finally:
        gate.close()
    assert refused.value.retry_after_s >= 1
    job.future.result(120)

    gate = Gate(runtime)
    try:
        jobs = [engine.submit(p, timeout_s=120) for p in small[:4]]  # 4 units: exactly full
        with pytest.raises(QueueFullError):
            engine.submit(small[4])
    finally:
        gate.close()
    for j in jobs:
        j.future.result(120)
    assert engine.work_in_flight == pytest.approx(0) and engine.in_flight == 0


def test_retry_after_is_the_wait_for_room_not_for_all_the_work(make_runtime):
    runtime = make_runtime("sd15", queue_capacity=20, max_batch_size=1, warmup=False)
    engine = runtime.engine
    big = runtime.params("big", width=128, height=128, steps=4 * STEPS, seed=1)  # 16 units
    gate = Gate(runtime)  # every job stays in flight until the checks are done
    try:
        jobs = [engine.submit(big, timeout_s=120)]
        jobs += [engine.submit(runtime.params(f"small {i}", seed=2 + i), timeout_s=120)
                 for i in range(4)]  # 4 units: full
        engine._seconds_per_unit = 2.0  # as if measured: 2 s per unit of work
        # Room for one more unit once the oldest job (16 units) has ended: 32 s, not the 40 s
        # all 20 units take.
        with pytest.raises(QueueFullError) as refused:
            engine.submit(runtime.params("one too many", seed=9))
        assert refused.value.retry_after_s == 32
        engine._seconds_per_unit = 10.0
        with pytest.raises(QueueFullError) as refused:
            engine.submit(runtime.params("one too many", seed=9))
        assert refused.value.retry_after_s == 60  # what clients wait at most
    finally:
        gate.close()
    for job in jobs:
        job.future.result(120)


def fails_alone(runtime, monkeypatch, method: str, error: Exception, **params) -> None:
    """``method`` of the family raises ``error`` for the request "bad" alone: it fails with
    that error, and "good", submitted with it into one batch, is answered all the same."""
    original = getattr(runtime.steps, method)

    def refuse_bad(job):
        if job.params.prompt == "bad":
            raise error
        original(job)

    monkeypatch.setattr(runtime.steps, method, refuse_bad)
    good = runtime.engine.submit(runtime.params("good", seed=1, **params), 60)
    bad = runtime.engine.submit(runtime.params("bad", seed=2, **params), 60)
    with pytest.raises(type(error), match=str(error)):
        bad.future.result(60)
    assert len(good.future.result(60)) == 1
    assert runtime.engine.in_flight == 0


@pytest.mark.parametrize("when", ["behind a group", "collected"])
def test_a_request_answered_in_a_batch_behind_another_group_leaves_before_it(make_runtime,
                                                                           when):
    # Request-level batching: two sizes collected in one batch run as two groups, one after
    # the other. The second's caller leaves while the first denoises ("behind a group"), or
    # while the stage still collects the batch, its window open, when the job is neither in
    # the queue nor behind a group yet ("collected"): its slot is free before the first
    # group is done.
    runtime = make_runtime("sd15", max_batch_size=3,
                           batch_window_ms=300 if when == "behind a group" else 1000,
                           warmup=False)
    denoise = next(s for s in runtime.engine.stages if s.name == "denoise")
    gate = Gate(runtime)
    try:
        first = runtime.engine.submit(runtime.params("first", seed=1), timeout_s=60)
        second = runtime.engine.submit(
            runtime.params("second", seed=2, width=128, height=128), timeout_s=60)
        if when == "behind a group":
            assert gate.entered.wait(30)
            wait_until(lambda: second in denoise._later)
            assert denoise.depth() == 1  # it waits in front of the denoiser, if not queued
        else:
            wait_until(lambda: first.waiting_at is denoise and second.waiting_at is denoise
                       and denoise.queue.qsize() == 0)
            assert not gate.entered.is_set() and second not in denoise._later
        second.future.cancel()
        assert second.released or when == "collected"  # at once, when behind a group
        assert gate.entered.wait(30)  # the first group denoises, held there
        wait_until(lambda: second.released)
        assert runtime.engine.in_flight == 1 and denoise.depth() == 0
    finally:
        gate.close()
    assert len(first.future.result(60)) == 1
    assert runtime.engine.in_flight == 0


def test_a_step_boundary_that_fails_while_retrying_answers_every_request(make_runtime,
                                                                          monkeypatch):
    # Step-level batching: a failed step sends its requests back to run alone; should that
    # fail too, each is answered, none left in neither list to wait for its timeout.
    runtime = make_runtime("sd15", **MODES["Step"], max_batch_size=2, batch_window_ms=300,
                           warmup=False)
    denoise = next(s for s in runtime.engine.stages if s.name == "denoise")
    original = runtime.steps.denoise_step

    def fails_batched(jobs, *args):
        if len(jobs) > 1:
            raise RuntimeError("out of memory")
        return original(jobs, *args)

    monkeypatch.setattr(runtime.steps, "denoise_step", fails_batched)

    def cannot_retry(*_):
        raise RuntimeError("the device is gone")

    monkeypatch.setattr(denoise, "_batch_failed", cannot_retry)
    jobs = [runtime.engine.submit(runtime.params(f"r{i}", seed=i), timeout_s=600)
            for i in range(2)]
    for job in jobs:
        with pytest.raises(RuntimeError):
            job.future.result(60)
    assert runtime.engine.in_flight == 0 and not denoise._in_hand


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("where", ["encode", "denoise_step", "decode"])
def test_a_batch_that_fails_runs_each_request_again_alone(make_runtime, monkeypatch, mode,
                                                          where):
    """A batch that fails as a whole (out of memory as one batch, one request's fault that
    takes the batch with it) runs each request again alone: the good one gets the image it
    gets alone, the bad one its own error. Edits of two images each: what a step run again
    must not redo on top of the first run (rows repeated, random draws taken)."""
    from server_testlib import source_image

    from imagegen_server.request import EditInput

    # Room for both requests' four images in one batch.
    runtime = make_runtime("sd15", **MODES[mode], max_batch_size=4, batch_window_ms=300,
                           warmup=False)
    original = getattr(runtime.steps, where)

    def fails_with_bad(jobs, *args):
        if any(job.params.prompt == "bad" for job in jobs) and (
            where != "denoise_step" or jobs[0].step == 3  # part way through the loop
        ):
            raise RuntimeError("out of memory")
        return original(jobs, *args)

    monkeypatch.setattr(runtime.steps, where, fails_with_bad)
    for stage in runtime.engine.stages:  # a stage that was handed the method itself
        if stage.step == original:
            monkeypatch.setattr(stage, "step", fails_with_bad)
    edit = EditInput(source_image(), 0.6, None)
    good_params = runtime.params("good", seed=1, n=2, steps=10, edit=edit)  # 6 steps run
    good = runtime.engine.submit(good_params, 60)
    bad = runtime.engine.submit(runtime.params("bad", seed=2, n=2, steps=10, edit=edit), 60)
    with pytest.raises(RuntimeError, match="out of memory"):
        bad.future.result(60)
    retried = good.future.result(60)
    alone = runtime.engine.generate(good_params, timeout_s=60)
    # The same image up to rounding: what ran before the failure ran batched with the bad
    # request (a batch's GEMMs may round a row apart from the same row alone; MKL's code path
    # for some CPUs does).
    assert len(retried) == len(alone)
    for got, want in zip(retried, alone, strict=True):
        assert_same_arithmetic(got, want)
    stage = "stacked" if mode == "Stacked" else where.removesuffix("_step")
    assert runtime.metrics.batches_retried.labels(stage=stage)._value.get() == 1
    assert runtime.engine.in_flight == 0
    if mode == "Step":  # nothing kept of the jobs that have left the stage
        denoise = next(s for s in runtime.engine.stages if s.name == "denoise")
        assert not denoise._entered and not denoise._alone


@pytest.mark.parametrize("mode", ["Pipelined", "Step"])
def test_a_failed_batchs_tensors_are_gone_before_its_requests_run_alone(make_runtime,
                                                                        monkeypatch, mode):
    """After a batch runs out of device memory, its requests run alone: with the failed
    batch's activations still held (by its traceback's frames) they would run out too."""
    runtime = make_runtime("sd15", **MODES[mode], max_batch_size=2, batch_window_ms=300,
                           warmup=False)
    original, scratch, alive_when_alone = runtime.steps.denoise_step, [], []

    def fails_batched(jobs, *args):
        if len(jobs) > 1:
            activations = torch.ones(256, 256)  # what the failed step held
            scratch.append(weakref.ref(activations))
            raise RuntimeError("out of memory")
        alive_when_alone.extend(ref() is not None for ref in scratch)
        return original(jobs, *args)

    monkeypatch.setattr(runtime.steps, "denoise_step", fails_batched)
    for stage in runtime.engine.stages:
        if stage.step == original:
            monkeypatch.setattr(stage, "step", fails_batched)
    jobs = [runtime.engine.submit(runtime.params(f"r{i}", seed=i, steps=2), timeout_s=600)
            for i in range(2)]
    for job in jobs:
        assert len(job.future.result(60)) == 1
    assert scratch and alive_when_alone and not any(alive_when_alone)


def test_a_failed_requests_error_keeps_where_it_was_raised_but_no_tensors(make_runtime,
                                                                          monkeypatch):
    """The error a request fails with is kept (by its job, its future) until the caller lets
    go; its frames would keep the failed step's tensors and the job, a cycle that only the
    garbage collector's rare full pass frees. It keeps where it was raised as text."""
    runtime = make_runtime("sd15", warmup=False)
    scratch = []

    def fails(jobs, *args):
        activations = torch.ones(256, 256)
        scratch.append(weakref.ref(activations))
        raise RuntimeError("out of memory")

    monkeypatch.setattr(runtime.steps, "decode", fails)
    for stage in runtime.engine.stages:
        if stage.name == "decode":
            monkeypatch.setattr(stage, "step", fails)
    gc.disable()  # freed by reference counting alone, as the server would need
    try:
        job = runtime.engine.submit(runtime.params("x", seed=1, steps=2), timeout_s=60)
        error = job.future.exception(60)
        assert isinstance(error, RuntimeError) and error.__traceback__ is None
        assert "in fails" in "\n".join(error.__notes__)
        assert scratch and scratch[0]() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("mode", MODES)
def test_a_request_that_cannot_start_denoising_fails_alone(make_runtime, monkeypatch, mode):
    """Its batch mate, in the same denoise batch, is answered as if it were alone."""
    runtime = make_runtime("sd15", **MODES[mode], max_batch_size=2, batch_window_ms=300,
                           warmup=False)
    fails_alone(runtime, monkeypatch, "prepare", RuntimeError("bad inputs"))


@pytest.mark.parametrize(("mode", "name"), [("Pipelined", "decode"), ("Step", "denoise")])
def test_a_stage_outlives_an_error_between_its_batches(make_runtime, monkeypatch, mode, name):
    """An error outside a batch's step (a device error surfacing where timings are read)
    leaves the stage serving, and fails none of its jobs: a dead stage would strand every
    job queued to it."""
    runtime = make_runtime("sd15", **MODES[mode], warmup=False)
    decode = next(stage for stage in runtime.engine.stages if stage.name == name)
    flush = decode._flush_timings
    failures = [RuntimeError("CUDA error: an illegal memory access was encountered")]

    def fail_once(*args, **kwargs):
        if failures:
            raise failures.pop()
        return flush(*args, **kwargs)

    monkeypatch.setattr(decode, "_flush_timings", fail_once)
    for seed in (1, 2):
        assert len(runtime.engine.generate(runtime.params("x", seed=seed), timeout_s=60)) == 1
    assert not failures and runtime.engine.in_flight == 0


def test_a_batch_whose_step_breaks_the_stage_contract_fails_and_the_stage_goes_on(
    make_runtime, monkeypatch
):
    # A step that answers for fewer jobs than it was given (a bug) fails its batch, inside
    # the stage's loop: the thread, and the jobs after, go on.
    runtime = make_runtime("sd15", warmup=False)
    decode = next(stage for stage in runtime.engine.stages if stage.name == "decode")
    step = decode.step
    monkeypatch.setattr(decode, "step", lambda jobs: [])
    with pytest.raises(RuntimeError, match="answered for 0 of 1"):
        runtime.engine.generate(runtime.params("x", seed=1), timeout_s=60)
    monkeypatch.setattr(decode, "step", step)
    assert len(runtime.engine.generate(runtime.params("x", seed=2), timeout_s=60)) == 1
    assert decode.alive and runtime.engine.fault is None and runtime.engine.in_flight == 0


class LoopBug(BaseException):
    """What no batch guard catches: a fault of the stage loop itself."""


def test_a_step_batching_thread_that_dies_leaves_no_job_counted_as_waiting(make_runtime,
                                                                             monkeypatch):
    runtime = make_runtime("sd15", **MODES["Step"], max_batch_size=2, batch_window_ms=1,
                           warmup=False)
    denoise = next(s for s in runtime.engine.stages if s.name == "denoise")
    advance = denoise._advance

    def dies_with_one_waiting(joined):
        if denoise.waiting:
            raise LoopBug("a bug in the loop itself")
        return advance(joined)

    monkeypatch.setattr(denoise, "_advance", dies_with_one_waiting)
    gate = Gate(runtime)  # the first request denoises while the second, of another size, waits
    try:
        first = runtime.engine.submit(runtime.params("first", seed=1), timeout_s=60)
        assert gate.entered.wait(30)
        second = runtime.engine.submit(
            runtime.params("second", seed=2, width=128, height=128), timeout_s=60)
        wait_until(lambda: denoise.queue.qsize() == 1)
    finally:
        gate.close()
    for job in (first, second):
        assert "denoise stage stopped working" in str(job.future.exception(30))
    assert not denoise.alive and runtime.engine.in_flight == 0
    assert denoise.depth() == 0  # imagegen_stage_queue_depth: nothing waits on a dead stage


def test_a_stage_thread_that_dies_leaves_no_job_of_another_shape_counted_as_waiting(
        make_runtime, monkeypatch):
    """Request-level batching: a batch of two sizes runs as two groups, the second waiting
    behind the first; the thread dies in the first."""
    runtime = make_runtime("sd15", **MODES["Pipelined"], max_batch_size=2,
                           batch_window_ms=1000, warmup=False)
    denoise = next(s for s in runtime.engine.stages if s.name == "denoise")
    held = []

    def dies_in_the_first_group(group):
        held.append(len(denoise._later))
        raise LoopBug("a bug in the loop itself")

    monkeypatch.setattr(denoise, "_process", dies_in_the_first_group)
    first = runtime.engine.submit(runtime.params("first", seed=1), timeout_s=60)
    second = runtime.engine.submit(
        runtime.params("second", seed=2, width=128, height=128), timeout_s=60)
    for job in (first, second):
        assert "denoise stage stopped working" in str(job.future.exception(30))
    assert held == [1]  # the second group waited behind the first
    assert not denoise.alive and runtime.engine.in_flight == 0
    assert denoise.depth() == 0  # imagegen_stage_queue_depth: nothing waits on a dead stage


def test_a_stage_thread_that_dies_answers_its_jobs_and_fails_health(client_for, monkeypatch):
    client = client_for(warmup=False)
    runtime = client.app.state.runtime
    denoise = next(stage for stage in runtime.engine.stages if stage.name == "denoise")
    gate = threading.Event()

    def process_then_die(group):
        gate.wait(30)  # a job is queued here when the thread dies
        raise LoopBug("a bug in the loop itself")

    monkeypatch.setattr(denoise, "_process", process_then_die)
    in_hand = runtime.engine.submit(runtime.params("in hand", seed=1), timeout_s=60)
    wait_until(lambda: denoise._holding)
    queued = runtime.engine.submit(runtime.params("queued", seed=2), timeout_s=60)
    wait_until(lambda: not denoise.queue.empty())
    gate.set()
    for job in (in_hand, queued):  # answered, not left waiting
        assert "denoise stage stopped working" in str(job.future.exception(30))
        assert job.released
    assert runtime.engine.fault and "denoise" in runtime.engine.fault
    # Restart me: /healthz fails, /readyz takes the pod out of its Service.
    health = client.get("/healthz")
    assert health.status_code == 500 and "denoise stage stopped" in health.text
    assert client.get("/readyz").status_code == 503
    assert "imagegen_ready 0.0" in client.get("/metrics").text  # an alert on it fires too
    late = client.post("/v1/images/generations", json={"prompt": "late"})
    assert late.status_code >= 500 and runtime.engine.in_flight == 0


def test_a_device_error_fails_health_so_the_pod_restarts(client_for, monkeypatch):
    """A CUDA error that leaves the context unusable (an illegal memory access, a
    device-side assert): every later request would fail while the stages live on, so
    /healthz fails and the kubelet restarts the pod. Other errors, and CUDA errors after
    which the device still works, stay the request's own."""
    client = client_for(warmup=False)
    runtime = client.app.state.runtime
    decode = next(stage for stage in runtime.engine.stages if stage.name == "decode")
    def fails(jobs):
        raise next(errors)

    monkeypatch.setattr(decode, "step", fails)
    usable = [True, False]  # the first CUDA error leaves the device working, the second not
    monkeypatch.setattr(engine_module, "device_usable", lambda: usable.pop(0))
    errors = iter([RuntimeError("one request's fault"),
                   torch.AcceleratorError("CUDA error: invalid configuration argument"),
                   torch.AcceleratorError("CUDA error: an illegal memory access")])
    ordinary = runtime.engine.submit(runtime.params("ordinary", seed=1), timeout_s=60)
    assert "one request's fault" in str(ordinary.future.exception(30))
    assert client.get("/healthz").status_code == 200
    passing = runtime.engine.submit(runtime.params("passing", seed=3), timeout_s=60)
    assert isinstance(passing.future.exception(30), torch.AcceleratorError)
    assert client.get("/healthz").status_code == 200
    lost = runtime.engine.submit(runtime.params("lost", seed=2), timeout_s=60)
    assert isinstance(lost.future.exception(30), torch.AcceleratorError)
    health = client.get("/healthz")
    assert health.status_code == 500 and "the device failed" in health.text
    assert "illegal memory" not in health.text  # the log has it, not an unauthenticated probe
    assert client.get("/readyz").status_code == 503


def test_an_edit_whose_image_cannot_be_encoded_fails_alone(make_runtime, monkeypatch):
    from server_testlib import source_image

    from imagegen_server.request import EditInput

    runtime = make_runtime("sd15", max_batch_size=2, batch_window_ms=300, warmup=False)
    fails_alone(runtime, monkeypatch, "_encode_image",
                ValueError("image cannot be preprocessed"),
                edit=EditInput(source_image(), 0.8, None))
