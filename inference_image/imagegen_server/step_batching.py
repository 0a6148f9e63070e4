"""Step-level batching: requests join the running denoise batch at the next step boundary.

With request-level batching (``Stage``) a denoise batch runs all its steps before the stage
looks at its queue again, so a request that arrives a moment after a batch started waits for
the whole batch. Here the stage loops over single denoiser steps instead: at each boundary it
takes what arrived, admits waiting jobs of the running batch's shape (``join_key``: size and
adapters), drops the cancelled, runs one step over the batch with each job at its own
timestep (its own scheduler, step count, strength and guidance), and hands the finished on to
decode. As InstGenIE (arXiv 2505.20600) and vLLM-Omni's step-level batching, it shortens the
wait in front of the denoiser that bursty traffic on a shared GPU creates.

Jobs are admitted in arrival order: a job of another shape at the head of the queue stops
admission until the running batch has drained, so no shape waits behind an endless stream of
another.

A step that fails over several jobs sends each of them back to the head of the queue, rewound
to where it entered the stage, to run again alone: only the job at fault (or none, when the
batch was too large for the device) fails.
"""

from __future__ import annotations

import logging
import queue
import time
from collections import deque

import torch

from .families import FamilySteps
from .families.base import drop_unwanted
from .request import Checkpoint, Job, JobTimeout
from .stages import STOP, OutputFn, Stage, images_of

log = logging.getLogger(__name__)


class StepBatchingStage(Stage):
    """The denoise stage, one denoiser step at a time over a batch that changes between steps.

    Metrics per step, not per batch: ``imagegen_stage_batch_size`` observes the requests each
    step ran and ``imagegen_stage_duration_seconds`` each step's time;
    ``imagegen_denoise_joins_total`` counts the requests that joined a batch under way.
    """

    def __init__(self, name: str, steps: FamilySteps, *, on_output: OutputFn, **kwargs):
        self.running: list[Job] = []
        # Taken off the queue at a step boundary, not of the running batch's shape (yet).
        self.waiting: deque[Job] = deque()
        # Between those lists (joining the batch, or a failed batch on its way back to
        # waiting): held here meanwhile, so an error in between fails them, not loses them.
        self._in_hand: list[Job] = []
        super().__init__(name, None, steps.join_key, on_output=on_output, **kwargs)
        self.family = steps
        self._members: list[Job] = []  # the batch the last step ran, for `changed`
        self._inputs: dict | None = None
        self._stopping = False
        # Each running job's state when it entered the stage, to run it again from there.
        self._entered: dict[Job, Checkpoint] = {}
        # Jobs of a failed batch, each to run again in a batch of its own.
        self._alone: set[Job] = set()

    def depth(self) -> int:
        return self.queue.qsize() + len(self.waiting)

    def _run(self) -> None:
        if self.stream is not None:
            torch.cuda.set_device(self.device)
        with torch.inference_mode():
            while not (self._stopping and not self.running and not self.waiting):
                try:
                    self._take_arrivals(block=not self.running and not self.waiting)
                    self._advance(self._admit())
                    self._forget_gone()
                except Exception as exc:  # the loop must outlive any one job
                    log.exception("%s stage: a step boundary failed", self.name)
                    self._fail_all(exc)
                try:
                    self._flush_timings(block=False)
                except Exception:
                    # As in Stage: an asynchronous device error met where timings are read;
                    # the jobs it concerns meet it in their own next step.
                    log.exception("%s stage could not read its timings", self.name)
            try:
                self._flush_timings(block=True)
            except Exception:
                log.exception("%s stage could not read its last timings", self.name)

    def _abandoned(self) -> list[Job]:
        jobs = [*self.running, *self.waiting, *self._in_hand, *super()._abandoned()]
        # Handed over to be failed: none waits here any more (the queue-depth gauge).
        self.running, self.waiting, self._in_hand = [], deque(), []
        return jobs

    def _fail_all(self, error: BaseException) -> None:
        for job in [*self.running, *self.waiting, *self._in_hand]:
            job.fail(error)
        self.running, self.waiting, self._in_hand = [], deque(), []
        self._entered, self._alone = {}, set()
        self._forget_batch()

    def _forget_batch(self) -> None:
        # Nothing runs: let go of the last batch's conditioning (device memory) and jobs.
        self._members, self._inputs = [], None

    def _take_arrivals(self, block: bool) -> None:
        """Everything queued now; when idle, first wait for one."""
        while not self._stopping:
            try:
                item = self.queue.get() if block else self.queue.get_nowait()
            except queue.Empty:
                return
            block = False
            if item is STOP:
                self._stopping = True  # finish what is running and waiting, then end
            else:
                self.waiting.append(item)

    def _admit(self) -> list[Job]:
        """Waiting jobs that join at this step: from the head of the queue, while they have
        the running batch's shape (or the head's, when nothing runs), while their images fit in
        max_batch_size."""
        # Running jobs whose caller left or whose deadline passed go first: their rows are
        # room for the waiting now, not a step later.
        self.running = drop_unwanted(self.running)
        waiting = deque()
        for job in self.waiting:
            if reason := job.drop_reason():
                job.fail(JobTimeout(f"{reason} before the {self.name} stage"))
            else:
                waiting.append(job)
        self.waiting = waiting
        if not waiting:
            return []
        if waiting[0] in self._alone or (self.running and self.running[0] in self._alone):
            # One of a failed batch runs alone: nothing joins it, and it joins nothing.
            self._in_hand = [waiting.popleft()] if not self.running else []
            return self._in_hand
        key = self._key_of(self.running[0] if self.running else waiting[0])
        joined = self._in_hand = []
        room = self.max_batch_size - sum(images_of(job) for job in self.running)
        while waiting and self._key_of(waiting[0]) == key and (
            images_of(waiting[0]) <= room
            # One of more images than a batch holds runs, alone, once nothing else does.
            or not self.running and not joined
        ):
            room -= images_of(waiting[0])
            joined.append(waiting.popleft())
        return joined

    def _key_of(self, job: Job):
        """The job's join key; a job whose key cannot be computed fails alone (and, gone from
        where it stood, lets the boundary's other jobs go on)."""
        try:
            return self.key(job)
        except Exception as exc:
            log.exception("%s stage could not place a request", self.name)
            job.fail(exc)
            if job in self.waiting:
                self.waiting.remove(job)
            return object()  # equal to no other key

    def _advance(self, joined: list[Job]) -> None:
        """One denoiser step over the running jobs and those joining; the done go to decode."""
        under_way = drop_unwanted(self.running)
        if joined and under_way:
            self.metrics.denoise_joins.inc(len(joined))
        batch = under_way + joined
        self.running = batch  # held here until the step is done, for _fail_all too
        self._in_hand = []
        if not batch:
            self._forget_batch()
            return
        self.metrics.batch_size.labels(stage=self.name).observe(len(batch))
        started = time.perf_counter()
        for job in joined:
            self._entered[job] = job.checkpoint()
        failed, retried = False, None
        try:
            if self.stream is None:
                self._step(batch, joined)
            else:
                self._on_stream(lambda jobs: self._step(jobs, joined), batch)
        except Exception as exc:
            failed, retried = True, self._step_failed(batch, exc)
        if failed:
            if retried is not None:
                # Out of the except clause: the failed step's tensors, which its traceback's
                # frames held, are gone before the jobs run alone.
                self._retry_alone(retried)
            return
        if self.stream is None:
            self.metrics.stage_seconds.labels(stage=self.name).observe(
                time.perf_counter() - started
            )
        self.running = []
        for job in batch:
            if job.released:
                continue
            if not job.denoised:
                self.running.append(job)
                continue
            try:
                self.on_output(job, None)
            except Exception as exc:
                job.fail(exc)
        if not self.running:
            # Done: the stage may now wait a long time for the next request, and must not
            # hold the last batch's conditioning (device memory) and its jobs meanwhile.
            self._forget_batch()

    def _forget_gone(self) -> None:
        """Checkpoints and run-alone marks are kept for the jobs still here (running or
        waiting) only: one place for every way a job leaves (done, dropped, failed)."""
        here = {*self.running, *self.waiting}
        self._entered = {job: c for job, c in self._entered.items() if job in here}
        self._alone &= here

    def _step_failed(self, batch: list[Job], error: Exception) -> type[Exception] | None:
        """A step over several jobs failed: each goes back to the head of the queue, as it
        entered the stage, to run alone (the error's kind is returned, for _retry_alone). A
        job that failed alone fails (None)."""
        self._in_hand, self.running = batch, []
        self._forget_batch()
        live = [job for job in batch if not job.released]
        if len(batch) == 1 or not live:
            log.exception("%s stage failed for a batch of %d", self.name, len(batch))
            for job in batch:
                job.fail(error)
            self._in_hand = []
            return None
        kind = self._batch_failed(len(batch), error)
        for job in reversed(live):
            job.rewind(self._entered[job])
            self._alone.add(job)
        self.waiting.extendleft(reversed(live))
        self._in_hand = []
        return kind

    def _step(self, batch: list[Job], joined: list[Job]) -> None:
        self.family.start_all(joined)
        batch = [job for job in batch if not job.released]
        if not batch:
            return
        if batch != self._members:
            # Jobs joined or left: the concatenated conditioning is built again.
            self.family.use_adapters(batch)
            self._inputs = self.family.batch_inputs(batch)
            self._members = list(batch)
        self.family.denoise_step(batch, self._inputs)
