"""Stage threads: each takes batches of jobs from a bounded queue, runs one step, hands on.

A stage batches dynamically: it waits for one job, then keeps collecting for up to
``batch_window_s`` or while the next job's images fit in ``max_batch_size`` (a request of ``n``
images is ``n`` rows of the step's batch, so the batch's memory is bounded by images, as the
operator's planner assumes), splits the batch into groups the step can run together (equal
``key``) and runs each group. On a GPU each stage has its own CUDA stream;
a job carries an event recorded after its last stage, and the next stage's stream waits on that
event, so hand-offs never block the host.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import traceback
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import torch

from .metrics import ServerMetrics
from .request import Job, JobTimeout, ShutdownError

log = logging.getLogger(__name__)

StepFn = Callable[[list[Job]], list[Any] | None]
KeyFn = Callable[[Job], Hashable]
OutputFn = Callable[[Job, Any], None]

# Put on a queue by stop(): finish what is queued, then end.
STOP = object()


class JobQueue(queue.Queue):
    """A stage's queue, from which a job whose caller left can be taken back out."""

    def withdraw(self, job: Job) -> bool:
        """Take ``job`` out if it still waits here: True when it did, and then no stage
        thread will ever see it. False once a thread has taken it (or it never came)."""
        with self.mutex:  # the lock every put and get holds (a documented way to subclass)
            try:
                self.queue.remove(job)
            except ValueError:
                return False
            self.not_full.notify()
            return True

    def get_within(self, rows: int, timeout: float) -> Any:
        """The job at the head if it has at most ``rows`` images (STOP always fits), waiting up
        to ``timeout`` seconds for one; None when it has more, which leaves it at the head for
        the next batch. Raises ``queue.Empty`` when nothing came."""
        with self.not_empty:  # as Queue.get, with a look at the head before taking it
            deadline = time.monotonic() + timeout
            while not self._qsize():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise queue.Empty
                self.not_empty.wait(remaining)
            head = self.queue[0]
            if head is not STOP and images_of(head) > rows:
                return None
            item = self._get()
            self.not_full.notify()
            return item


def images_of(job: Job) -> int:
    """The rows a job adds to a batch, before guidance doubles them: its images."""
    return job.params.n


class Stage:
    def __init__(
        self,
        name: str,
        step: StepFn,
        key: KeyFn,
        *,
        max_batch_size: int,
        batch_window_s: float,
        capacity: int,
        metrics: ServerMetrics,
        device: torch.device,
        on_output: OutputFn,
    ):
        self.name = name
        self.step = step
        self.key = key
        self.max_batch_size = max_batch_size
        self.batch_window_s = batch_window_s
        self.metrics = metrics
        self.on_output = on_output
        # Admission control upstream keeps the total in flight at most `capacity`, so a put
        # here never blocks; the bound is a guard, not the back-pressure mechanism. One more
        # for STOP, which stop() puts holding the lock a dying thread takes too.
        self.queue = JobQueue(maxsize=capacity + 1)
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._pending_timings: list[tuple[str, Any, Any]] = []  # (stage label, start, done)
        # Set by stop(), under the lock put() takes: nothing is queued behind STOP.
        self._stopped = False
        self._lock = threading.Lock()
        # Why the thread ended other than by stop(): a stage that died (/healthz reports it).
        self.died: BaseException | None = None
        self._holding: list[Job] = []  # the batch the thread has taken off the queue
        # Of that batch, the jobs of the groups not started yet (under _lock): one answered
        # meanwhile leaves at once, as a queued one does, not when the groups ahead are done.
        self._later: set[Job] = set()
        self._thread = threading.Thread(target=self._guarded_run, name=f"stage-{name}",
                                        daemon=True)
        metrics.queue_depth.labels(stage=name).set_function(self.depth)
        metrics.batch_size.labels(stage=name)  # present before traffic, as the queue is

    def depth(self) -> int:
        """Jobs waiting in front of this stage (``imagegen_stage_queue_depth``): queued, or
        taken in a batch behind a group of another shape."""
        return self.queue.qsize() + len(self._later)

    def take_back(self, job: Job) -> None:
        """A job answered before this stage's thread took it (its caller cancelled or timed
        out, or a drain's deadline passed) leaves the queue now, and its slot is freed: not
        once the batch ahead of it is done, seconds of denoising that would refuse new
        requests meanwhile. Called when the answer comes and when the job is put here after
        it; the queue's lock lets only one of them (or the thread) take it. One a thread has
        taken is dropped by that stage at its next step."""
        if not job.future.done() or job.released:
            return
        if not self.queue.withdraw(job):
            with self._lock:
                if job not in self._later:
                    return  # running (dropped at its next step), or gone
                self._later.discard(job)
        job.fail(JobTimeout(f"{job.drop_reason()} before the {self.name} stage"))

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def put(self, job: Job) -> None:
        with self._lock:
            queued = not self._stopped
            if queued:
                job.waiting_at = self
                self.queue.put(job)
        if queued:
            self.take_back(job)  # answered while the stage before held it
            return
        if self.died is not None:
            job.fail(RuntimeError(f"the {self.name} stage stopped working: {self.died!r}"))
            return
        # A stage before this one outlasted its stop's timeout and handed on late: nothing
        # would take the job now, so its caller is answered instead of left waiting.
        job.fail(ShutdownError(f"the server stopped before the {self.name} stage"))

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is queued, then end the thread; what is put after this fails."""
        with self._lock:
            running = self._thread.is_alive()
            if running and not self._stopped:
                self.queue.put(STOP)
            self._stopped = True
        if running:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """Whether the stage still takes work (or was stopped): false once its thread died."""
        return self.died is None

    # --- the loop -----------------------------------------------------------------------------
    def _guarded_run(self) -> None:
        """The loop, and what follows if it ever ends other than by stop() (a bug, or a
        device that cannot be selected): every job queued here is answered, and what is put
        later fails at once, instead of waiting on a thread that is gone."""
        try:
            self._run()
        except BaseException as exc:
            log.critical("%s stage stopped working", self.name, exc_info=True)
            self.died = exc
            error = RuntimeError(f"the {self.name} stage stopped working: {exc!r}")
            with self._lock:
                self._stopped = True
            for job in self._abandoned():
                job.fail(error)

    def _abandoned(self) -> list[Job]:
        """The jobs this stage holds that no thread will run: in hand, and queued."""
        with self._lock:
            # Those behind a group of another shape are in hand too: none waits any more
            # (the queue-depth gauge).
            self._later = set()
        jobs = [job for job in self._holding if not job.released]
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return jobs
            if item is not STOP:
                jobs.append(item)

    def _run(self) -> None:
        if self.stream is not None:
            # The current device is per thread; a new thread starts on cuda:0.
            torch.cuda.set_device(self.device)
        # Inference mode is thread-local, so each stage thread enters it itself.
        with torch.inference_mode():
            while True:
                batch, stop = self._collect()
                self._holding = batch
                try:
                    groups = _groups(batch, self.key)
                except Exception as exc:  # these jobs' keys, not the stage: it goes on
                    log.exception("%s stage could not group a batch of %d", self.name, len(batch))
                    for job in batch:
                        job.fail(exc)
                    groups = []
                for index, group in enumerate(groups):
                    # What a dying thread must still answer: the groups not yet run.
                    self._holding = [job for later in groups[index:] for job in later]
                    with self._lock:
                        self._later = {job for later in groups[index + 1:] for job in later}
                        # Answered while the batch was being collected, when neither the
                        # queue nor _later held them: take_back found nothing to free then.
                        answered = ([job for job in self._later if job.future.done()]
                                    if index == 0 else [])
                    for job in answered:
                        self.take_back(job)
                    try:
                        self._process(group)
                    except Exception as exc:  # a fault of this group's, not of the stage
                        log.exception("%s stage failed for a batch of %d", self.name, len(group))
                        for job in group:
                            job.fail(exc)
                self._holding = []
                with self._lock:
                    self._later = set()
                try:
                    self._flush_timings(block=stop)
                except Exception:
                    # A device error surfacing where the timings are read (CUDA reports
                    # asynchronously): the jobs it concerns have gone on and meet it there.
                    # The stage stays alive: a dead one would strand every job queued to it.
                    log.exception("%s stage could not read its timings", self.name)
                if stop:
                    return

    def _collect(self) -> tuple[list[Job], bool]:
        first = self.queue.get()
        if first is STOP:
            return [], True
        # The first job runs whatever its images: one of more than max_batch_size runs alone.
        batch, rows = [first], images_of(first)
        deadline = time.monotonic() + self.batch_window_s
        while rows < self.max_batch_size:
            try:
                item = self.queue.get_within(self.max_batch_size - rows,
                                             deadline - time.monotonic())
            except queue.Empty:
                break
            if item is None:
                break  # the next job's images would overfill the batch: it starts the next
            if item is STOP:
                # Run what was collected, then stop.
                return batch, True
            batch.append(item)
            rows += images_of(item)
        return batch, False

    def _process(self, group: list[Job], retry: bool = True) -> None:
        """Run the step on the group's live jobs and hand each on. When a batch of several
        fails, each of its jobs runs again alone (``retry``: once): one request's fault, or a
        batch too large for the device's memory, fails only the request it belongs to."""
        live = []
        for job in group:
            # A caller that gave up, or a deadline that passed: drop the job before any work,
            # which frees its slot.
            if reason := job.drop_reason():
                job.fail(JobTimeout(f"{reason} before the {self.name} stage"))
                continue
            live.append(job)
        if not live:
            return
        self.metrics.batch_size.labels(stage=self.name).observe(len(live))
        checkpoints = [job.checkpoint() for job in live] if retry and len(live) > 1 else None
        started = time.perf_counter()
        failed = None
        try:
            outputs = self.step(live) if self.stream is None else self._on_stream(self.step, live)
            if outputs is not None and len(outputs) != len(live):
                # Checked before any job is handed on: none goes on while its batch fails.
                raise RuntimeError(f"the {self.name} step answered for {len(outputs)} of "
                                   f"{len(live)} requests")
        except Exception as exc:
            if checkpoints is None:
                log.exception("%s stage failed for a batch of %d", self.name, len(live))
                for job in live:
                    job.fail(exc)
                return
            failed = self._batch_failed(len(live), exc)
        if failed is not None:
            # Out of the except clause: the failed batch's tensors, which its traceback's
            # frames held, are gone before the smaller runs allocate theirs.
            self._retry_alone(failed)
            for job, checkpoint in zip(live, checkpoints, strict=True):
                if not job.released:  # one the step failed alone already stays failed
                    job.rewind(checkpoint)
                    self._process([job], retry=False)
            return
        if self.stream is None:
            self.metrics.stage_seconds.labels(stage=self.name).observe(
                time.perf_counter() - started
            )
        outputs = outputs if outputs is not None else [None] * len(live)
        for job, output in zip(live, outputs, strict=True):
            if job.released:
                continue  # dropped by the step itself (cancelled between denoising steps)
            try:
                self.on_output(job, output)
            except Exception as exc:
                job.fail(exc)

    def _batch_failed(self, size: int, error: Exception) -> type[Exception]:
        """A batch of ``size`` failed and its requests run again alone: say so and count it.
        The error's kind, for ``_retry_alone``; the error itself, with its frames, is let go."""
        log.warning("%s stage failed for a batch of %d (%r): each request again on its own",
                    self.name, size, error, exc_info=True)
        self.metrics.batches_retried.labels(stage=self.name).inc()
        traceback.clear_frames(error.__traceback__)
        return type(error)

    def _retry_alone(self, failed: type[Exception]) -> None:
        """Before the failed batch's requests run alone: after an out of memory, the cached
        blocks go back to the device."""
        if self.stream is not None and issubclass(failed, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()

    def _on_stream(self, step: StepFn, jobs: list[Job]) -> list[Any] | None:
        """``step(jobs)`` on this stage's stream, after the work each job waits on."""
        stream = self.stream
        start = torch.cuda.Event(enable_timing=True)
        done = torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            for job in jobs:
                if job.ready_event is not None:
                    stream.wait_event(job.ready_event)
                _record_tensors_on(stream, job)
            start.record(stream)
            outputs = step(jobs)
            done.record(stream)
        for job in jobs:
            job.ready_event = done
        self._pending_timings.append((self.name, start, done))
        return outputs

    @contextlib.contextmanager
    def timed(self, label: str) -> Iterator[None]:
        """Time a part of this stage's step as ``imagegen_stage_duration_seconds{stage=label}``:
        device time on a GPU (events on this stage's stream, read later without a sync: the
        host returns from a launch long before the work is done), host time elsewhere."""
        if self.stream is None:
            started = time.perf_counter()
            yield
            self.metrics.stage_seconds.labels(stage=label).observe(time.perf_counter() - started)
            return
        start = torch.cuda.Event(enable_timing=True)
        done = torch.cuda.Event(enable_timing=True)
        start.record(self.stream)
        yield
        done.record(self.stream)
        self._pending_timings.append((label, start, done))

    def _flush_timings(self, block: bool) -> None:
        """Observe GPU-side stage durations whose end events have completed, without syncing."""
        still_pending = []
        for label, start, done in self._pending_timings:
            if block:
                done.synchronize()
            if done.query():
                seconds = start.elapsed_time(done) / 1000.0
                self.metrics.stage_seconds.labels(stage=label).observe(seconds)
            else:
                still_pending.append((label, start, done))
        self._pending_timings = still_pending


def _groups(batch: list[Job], key: KeyFn) -> list[list[Job]]:
    groups: dict[Hashable, list[Job]] = {}
    for job in batch:
        groups.setdefault(key(job), []).append(job)
    return list(groups.values())


def _record_tensors_on(stream, job: Job) -> None:
    # Tensors made on another stage's stream are used on this one: tell the caching allocator,
    # so their memory is not reused before this stream is done with them.
    tensors = [v for v in job.conditioning.values() if isinstance(v, torch.Tensor)]
    if isinstance(job.latents, torch.Tensor):
        tensors.append(job.latents)
    for tensor in tensors:
        if tensor.is_cuda:
            tensor.record_stream(stream)
