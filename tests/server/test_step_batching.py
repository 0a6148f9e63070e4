"""Step-level batching: requests join a running denoise batch at the next step, and each one's
image still equals diffusers' own pipeline for its seed.

A gate on the denoiser holds one of its calls until the test has put the next requests in front
of the denoise stage, so what joins when is decided by the test, not by the machine's speed.
"""

from __future__ import annotations

import time

import pytest
from server_testlib import FAMILIES, MODES, STEPS, Gate, mean_abs_diff, wait_until

from imagegen_server.request import JobTimeout


def joins(runtime) -> float:
    return runtime.metrics.denoise_joins._value.get()


def step_runtime(make_runtime, family="sd15", **overrides):
    settings = {"max_batch_size": 4, "batch_window_ms": 2, "default_width": 64,
                "default_height": 64, **overrides}
    return make_runtime(family, **MODES["Step"], **settings)


@pytest.mark.parametrize("family", FAMILIES)
def test_requests_that_join_mid_batch_equal_diffusers(make_runtime, reference_pipeline, family):
    runtime = step_runtime(make_runtime, family)
    pipe = reference_pipeline(family)
    denoise = runtime.engine.stages[1]
    first = runtime.params("a red cat", seed=1, steps=STEPS + 3)
    # Other step counts, guidance scales, a negative prompt and two images: rows at other
    # timesteps with other schedulers, in the same denoiser calls.
    later = [
        runtime.params("a blue house", seed=2, guidance_scale=1.0),
        runtime.params("a green tree", seed=3, n=2, negative_prompt="blurry", steps=STEPS + 1),
    ]
    gate = Gate(runtime)
    try:
        jobs = [runtime.engine.submit(first, timeout_s=60)]
        assert gate.entered.wait(30)
        jobs += [runtime.engine.submit(p, timeout_s=60) for p in later]
        wait_until(lambda: denoise.queue.qsize() == len(later))
    finally:
        gate.close()
    for params, job in zip([first, *later], jobs, strict=True):
        images = job.future.result(60)
        expected = pipe(**runtime.steps.reference_kwargs(params)).images
        diffs = [mean_abs_diff(a, b) for a, b in zip(images, expected, strict=True)]
        assert len(images) == params.n and max(diffs) < 1.0, diffs
    # Both joined the first request's batch after its first step.
    assert joins(runtime) == 2


def test_another_size_waits_its_turn_in_arrival_order(make_runtime, reference_pipeline):
    runtime = step_runtime(make_runtime)
    pipe = reference_pipeline("sd15")
    denoise = runtime.engine.stages[1]
    done_at: dict[str, float] = {}
    params = {
        "running": runtime.params("a red cat", seed=1),
        "wide": runtime.params("a wide one", seed=2, width=96),
        # Same size as the running batch, but behind the wide one: it does not overtake it.
        "behind": runtime.params("a blue house", seed=3),
    }
    jobs = {}

    def submit(name):
        jobs[name] = job = runtime.engine.submit(params[name], timeout_s=60)
        job.future.add_done_callback(lambda _: done_at.setdefault(name, time.monotonic()))

    gate = Gate(runtime)
    try:
        submit("running")
        assert gate.entered.wait(30)
        for queued, name in enumerate(("wide", "behind"), start=1):
            submit(name)
            # One at a time, so they reach the denoise stage in this order.
            wait_until(lambda queued=queued: denoise.queue.qsize() == queued)
    finally:
        gate.close()
    for name, job in jobs.items():
        images = job.future.result(60)
        expected = pipe(**runtime.steps.reference_kwargs(params[name])).images
        assert mean_abs_diff(images[0], expected[0]) < 1.0, name
    assert joins(runtime) == 0
    assert done_at["running"] < done_at["wide"] < done_at["behind"], done_at


def test_requests_held_behind_a_batch_of_another_size_count_in_the_queue_depth(make_runtime):
    runtime = step_runtime(make_runtime)
    denoise = runtime.engine.stages[1]

    def depth() -> float:
        return runtime.metrics.registry.get_sample_value(
            "imagegen_stage_queue_depth", {"stage": "denoise"})

    first, second = Gate(runtime, at=1), Gate(runtime, at=2)
    try:
        jobs = [runtime.engine.submit(runtime.params("a red cat", seed=1), timeout_s=60)]
        assert first.entered.wait(30)
        jobs += [runtime.engine.submit(runtime.params(f"wide {i}", seed=2 + i, width=96),
                                       timeout_s=60) for i in range(2)]
        wait_until(lambda: denoise.queue.qsize() == 2)
        assert depth() == 2
        first.close()
        assert second.entered.wait(30)  # the next step: the wide ones are off the queue ...
        assert denoise.queue.qsize() == 0 and len(denoise.waiting) == 2
        assert depth() == 2  # ... and still counted
    finally:
        first.close()
        second.close()
    for job in jobs:
        job.future.result(60)
    assert depth() == 0


def test_a_request_that_times_out_leaves_the_running_batch(make_runtime, reference_pipeline):
    runtime = step_runtime(make_runtime)
    pipe = reference_pipeline("sd15")
    denoise = runtime.engine.stages[1]
    steady = runtime.params("a red cat", seed=1, steps=STEPS + 2)
    hasty = runtime.params("a blue house", seed=2)
    gate = Gate(runtime)
    # The second call is the first with both: it takes longer than the hasty one's deadline,
    # which leaves a busy runner seconds to encode the hasty one first.
    slow_step = Gate(runtime, at=2, hold_s=8.0)
    try:
        kept = runtime.engine.submit(steady, timeout_s=60)
        assert gate.entered.wait(30)
        dropped = runtime.engine.submit(hasty, timeout_s=6.0)
        wait_until(lambda: denoise.queue.qsize() == 1)
    finally:
        gate.close()
    with pytest.raises(JobTimeout, match="at denoising step 1"):
        dropped.future.result(60)
    images = kept.future.result(60)
    expected = pipe(**runtime.steps.reference_kwargs(steady)).images
    assert mean_abs_diff(images[0], expected[0]) < 1.0
    slow_step.close()
    wait_until(lambda: runtime.engine.in_flight == 0)
    assert joins(runtime) == 1


def test_requests_join_while_their_images_fit_and_a_larger_one_runs_alone(make_runtime):
    runtime = step_runtime(make_runtime, max_batch_size=2, max_images_per_request=3)
    denoise = runtime.engine.stages[1]
    rows: list[int] = []
    runtime.steps.pipeline.unet.register_forward_pre_hook(
        lambda _, args: rows.append(args[0].shape[0]))
    params = [runtime.params("one", seed=1, steps=STEPS + 2), runtime.params("two", seed=2, n=2),
              runtime.params("three", seed=3, n=3)]
    each = 2 if params[0].guidance_scale > 1 else 1
    gate = Gate(runtime)
    try:
        jobs = [runtime.engine.submit(params[0], timeout_s=60)]
        assert gate.entered.wait(30)
        for queued, p in enumerate(params[1:], start=1):
            jobs.append(runtime.engine.submit(p, timeout_s=60))
            wait_until(lambda queued=queued: denoise.queue.qsize() == queued)  # in this order
    finally:
        gate.close()
    for p, job in zip(params, jobs, strict=True):
        assert len(job.future.result(60)) == p.n
    # Two images do not join a batch of one under way (three are more than it holds); the
    # three-image request is larger than any batch, and runs alone after the two-image one.
    assert joins(runtime) == 0
    assert rows == [each] * (STEPS + 2) + [2 * each] * STEPS + [3 * each] * STEPS, rows


def test_a_cancelled_row_is_room_for_a_waiting_request_at_the_next_step(make_runtime):
    runtime = step_runtime(make_runtime, max_batch_size=2)
    denoise = runtime.engine.stages[1]
    rows: list[int] = []
    runtime.steps.pipeline.unet.register_forward_pre_hook(
        lambda _, args: rows.append(args[0].shape[0]))
    params = [runtime.params(name, seed=seed, steps=STEPS + 4)
              for seed, name in enumerate(("kept", "cancelled", "waiting"), start=1)]
    each = 2 if params[0].guidance_scale > 1 else 1  # a row with and one without the prompt
    first, full = Gate(runtime), Gate(runtime, at=2)  # full: the first step with two
    try:
        kept = runtime.engine.submit(params[0], timeout_s=60)
        assert first.entered.wait(30)
        cancelled = runtime.engine.submit(params[1], timeout_s=60)
        wait_until(lambda: denoise.queue.qsize() == 1)
        first.close()
        assert full.entered.wait(30)  # a full batch: the third request has to wait
        waiting = runtime.engine.submit(params[2], timeout_s=60)
        wait_until(lambda: denoise.queue.qsize() == 1)
        cancelled.future.cancel()  # what the HTTP layer does when a client goes away
    finally:
        first.close()
        full.close()
    kept.future.result(60)
    waiting.future.result(60)
    assert cancelled.released
    # The step right after is full again: the waiting request took the cancelled one's rows.
    assert rows[1] == rows[2] == 2 * each, rows


def test_a_request_that_cannot_start_fails_alone(make_runtime, reference_pipeline):
    runtime = step_runtime(make_runtime)
    pipe = reference_pipeline("sd15")
    denoise = runtime.engine.stages[1]
    start = runtime.steps.start_denoising

    def start_or_fail(job):
        if job.params.prompt == "broken":
            raise RuntimeError("cannot start denoising")
        start(job)

    runtime.steps.start_denoising = start_or_fail
    steady = runtime.params("a red cat", seed=1)
    gate = Gate(runtime)
    try:
        kept = runtime.engine.submit(steady, timeout_s=60)
        assert gate.entered.wait(30)
        broken = runtime.engine.submit(runtime.params("broken", seed=2), timeout_s=60)
        wait_until(lambda: denoise.queue.qsize() == 1)
    finally:
        gate.close()
    with pytest.raises(RuntimeError, match="cannot start denoising"):
        broken.future.result(60)
    # The batch it tried to join went on without it.
    expected = pipe(**runtime.steps.reference_kwargs(steady)).images
    assert mean_abs_diff(kept.future.result(60)[0], expected[0]) < 1.0
    wait_until(lambda: runtime.engine.in_flight == 0)


def test_an_idle_stage_lets_go_of_its_last_batch(make_runtime):
    runtime = step_runtime(make_runtime)
    denoise = runtime.engine.stages[1]
    job = runtime.engine.submit(runtime.params("a kite", seed=4), timeout_s=60)
    assert len(job.future.result(60)) == 1
    # Nothing arrives: the conditioning and the jobs of the batch that ended are not held.
    wait_until(lambda: not denoise.running and denoise._members == [])
    assert denoise._inputs is None
