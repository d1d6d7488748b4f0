"""The daemon: a sliding window of provider calls, fed and recorded by one kernel call per batch.

`kernel.worker_step` does in one transaction what 1.0 did in eight: it fences the jobs the
daemon holds, records the results that came back, renews the leases, ends finished jobs, claims
new ones and marks the next items dispatched. That commit comes before any provider call for
those items (invariant 1), and the daemon never has more than `concurrency` items dispatched
and unrecorded, so after a crash at most `concurrency` items can end `unknown`.

Two steps in flight: a stepper thread runs each worker_step on the daemon's connection while the
main thread turns the last step's answer into provider calls and gathers what came back for the
next one, so the database and the daemon work at the same time instead of taking turns. The
window counts what the steps in flight may still dispatch, so the bound above holds with them.

Threads: the main thread owns all state; the stepper thread makes the worker_step calls;
`concurrency` provider threads make the provider calls; one listener thread (optional) turns
NOTIFY into wake-ups.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from queue import Empty, SimpleQueue
from typing import Any, NamedTuple
from uuid import UUID

import psycopg
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from kernel_driver.db import DatabaseUnreachable, connect
from kernel_driver.providers import (
    OutboundItem,
    ProviderAdapter,
    ProviderConfigError,
    SendResult,
    installed_providers,
    load_adapter,
    open_adapter,
    outbox_outcome,
)
from kernel_driver.queries import (
    TERMINAL_RUN_STATUSES,
    Kernel,
    Result,
    StepRequest,
    StepRow,
    listen,
    response_json,
)

log = logging.getLogger(__name__)

ITEMS = Counter(
    "kernel_items_total", "Outbox items this daemon finished, by outcome", ["channel", "provider", "outcome"]
)
CALL_SECONDS = Histogram("kernel_provider_call_seconds", "Provider call latency", ["provider"])
JOBS_CLAIMED = Counter("kernel_jobs_claimed_total", "Jobs this daemon claimed")
JOBS_RECLAIMED = Counter(
    "kernel_jobs_reclaimed_total", "Jobs claimed again after a release or an expired lease"
)
LEASE_LOSSES = Counter("kernel_lease_losses_total", "Jobs this daemon lost to another worker (fenced)")
STEPS = Counter("kernel_worker_steps_total", "worker_step calls (one transaction each)")
QUEUE_JOBS = Gauge("kernel_queue_jobs", "Jobs in the queue by status (all workers)", ["status"])
QUEUE_OLDEST = Gauge(
    "kernel_queue_oldest_job_age_seconds", "Age of the oldest job by status (all workers)", ["status"]
)

# Seconds before an item the provider did not take (or that a lost worker left undispatched)
# goes out again, by how often it was dispatched before; the kernel fails it after 5.
RETRY_BACKOFF_S = (0.0, 0.2, 0.5, 1.0, 2.0, 5.0)
# How long a finished call may wait for its neighbours before the step that records it.
GATHER_S = 0.002
# worker_step calls submitted and not yet answered: one runs while the daemon prepares the next.
STEPS_IN_FLIGHT = 2
# The fewest items a step may dispatch when the window is shared between the steps in flight: a
# step costs about as much as 60 items in fixed SQL, so a window of 16 split in two ran 30%
# slower (noop, 10,000 items); below twice this a step takes the whole window.
MIN_STEP_SHARE = 64


@dataclass(frozen=True)
class WorkerConfig:
    dsn: str
    schema: str
    worker_id: str
    concurrency: int = 8
    poll_interval: float = 2.0
    lease_seconds: float = 30.0
    grace_seconds: float = 10.0
    until_idle: bool = False
    metrics_port: int | None = None
    tenant_ids: tuple[UUID, ...] | None = None  # None: every tenant
    # Where LISTEN runs: the DSN itself unless given; None with listen=False (poll only).
    listen_dsn: str | None = None
    listen: bool = True


Id = str  # job, run, item and contact ids as worker_step returns them (queries.StepRow)


class Item(NamedTuple):
    """An item row of worker_step (the columns in its order, so a row slice makes one)."""

    job_id: Id
    run_id: Id
    id: Id
    idempotency_key: str
    recipient: str
    contact_id: Id


@dataclass
class HeldJob:
    id: Id
    run_id: Id
    attempt: int
    channel: str
    provider: str
    content: Any
    remaining: int  # contacts of the job that have no item yet
    adapter: ProviderAdapter | None = None
    error: str | None = None  # the provider cannot be used: the job is failed with this
    cancelled: bool = False
    in_flight: int = 0
    waiting: dict[Id, tuple[Item, float]] = field(default_factory=dict)  # item -> (item, ready at)
    handed: set[Id] = field(default_factory=set)  # items this daemon took to send, while holding the job
    submitted: int = 0  # results of this job in steps not answered yet
    ending: bool = False  # a step not answered yet asks to complete or fail it
    complete_asked: bool = False
    counted: dict[str, Any] = field(default_factory=dict)  # outcome -> its ITEMS child

    def count(self, outcome: str) -> None:
        if outcome not in self.counted:
            self.counted[outcome] = ITEMS.labels(self.channel, self.provider, outcome)
        self.counted[outcome].inc()

    @property
    def finished(self) -> bool:
        # A result in a step not answered yet may still come back as a retry.
        return (self.in_flight == 0 and not self.waiting and self.submitted == 0 and not self.ending
                and (self.cancelled or self.remaining == 0))


@dataclass
class Submitted:
    """A step handed to the stepper, with what to give back to the daemon if it never ran."""

    request: StepRequest
    result_jobs: list[HeldJob]  # the job of each of request.results
    redispatched: list[tuple[HeldJob, Item, float]]  # waiting items the step takes
    ending: list[HeldJob]  # jobs the step asks to complete or fail


class Stepper:
    """Runs the submitted worker_step calls one after another on the daemon's connection, in a
    thread of its own. After a failed call it runs none of the calls queued behind it (each was
    sized on the failed one's results being recorded): they are answered NOT_RUN."""

    NOT_RUN = object()

    def __init__(self, kernel: Kernel, wake: threading.Event) -> None:
        self._kernel = kernel
        self._wake = wake
        self._todo: SimpleQueue[StepRequest | None] = SimpleQueue()
        self.answers: SimpleQueue[tuple[StepRequest, Any]] = SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="stepper", daemon=True)
        self._thread.start()

    def submit(self, request: StepRequest) -> None:
        self._todo.put(request)

    def close(self) -> None:
        self._todo.put(None)
        self._thread.join()

    def _run(self) -> None:
        failed = False
        while (request := self._todo.get()) is not None:
            answer: Any = self.NOT_RUN
            if not failed:
                try:
                    answer = self._kernel.worker_step(request)
                except BaseException as exc:  # handed to the main thread, which raises it
                    answer, failed = exc, True
            self.answers.put((request, answer))
            self._wake.set()


class Worker:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.stop = threading.Event()
        self._wake = threading.Event()
        self._notified = True  # claim at start
        self._tasks: SimpleQueue[tuple[HeldJob, Item] | None] = SimpleQueue()
        self._done: SimpleQueue[tuple[HeldJob, Item, SendResult]] = SimpleQueue()
        self._adapters: dict[str, ProviderAdapter] = {}
        self._timers: dict[str, Any] = {}  # CALL_SECONDS by provider
        self._jobs: dict[Id, HeldJob] = {}
        self._in_flight = 0
        self._unrecorded: list[tuple[HeldJob, Result]] = []
        self._submitted: deque[Submitted] = deque()
        self._failure: BaseException | None = None  # a step failed; raised once all are answered
        concurrency = config.concurrency
        self._step_share = max(-(-concurrency // STEPS_IN_FLIGHT), min(concurrency, MIN_STEP_SHARE))
        # A step that takes the whole window leaves the next nothing to dispatch: it would only
        # split the results and job endings into more, smaller steps (one-contact campaigns at
        # --concurrency 16: 488-491 messages/s with two in flight, 755-930 with one).
        self._steps_in_flight = STEPS_IN_FLIGHT if self._step_share < concurrency else 1
        self._deduplicating = [name for name in installed_providers() if _deduplicates(name)]
        self._last_step = 0.0
        self._next_claim = 0.0  # when to look for work again without a NOTIFY
        self._rate_until = 0.0  # a shared rate limit allows no send before this
        self._job_size = 1000.0  # contacts per job in the last claim (at first: one batch)
        self._stop_at: float | None = None
        self._first_result_at: float | None = None  # when the oldest unrecorded result came back
        self._threads = [
            threading.Thread(target=self._call_providers, name=f"provider-{n}", daemon=True)
            for n in range(config.concurrency)
        ]

    # --- lifecycle ------------------------------------------------------------------------

    def run(self) -> None:
        """Work until stopped (or, with until_idle, until no queued or processing job is left)."""
        if self.config.metrics_port:
            start_http_server(self.config.metrics_port, addr="127.0.0.1")
        for thread in self._threads:
            thread.start()
        if self.config.listen:
            threading.Thread(target=self._listen, name="listener", daemon=True).start()
        log.info("worker started", extra={"worker": self.config.worker_id})
        try:
            self._serve()
        finally:
            self.stop.set()
            for _ in self._threads:
                self._tasks.put(None)
            for adapter in self._adapters.values():
                adapter.close()
            log.info("worker stopped", extra={"worker": self.config.worker_id})

    def _serve(self) -> None:
        """Step until done; a lost connection is reopened, keeping every outcome seen so far
        (the next step records it, fenced, if the lease is still held)."""
        lost = False
        while True:
            try:
                with connect(self.config.dsn, autocommit=True) as conn:
                    kernel = Kernel(conn, self.config.schema)
                    if lost:
                        self._take_back_undispatched(kernel)
                    if self._loop(kernel):
                        return
            except (psycopg.OperationalError, DatabaseUnreachable) as exc:
                lost = True
                if self._stop_expired():
                    log.error("database unreachable while stopping: %s", exc)
                    return
                log.error("database connection lost, reconnecting: %s", exc)
                time.sleep(min(self.config.poll_interval, 0.5))

    def _take_back_undispatched(self, kernel: Kernel) -> None:
        """A step lost with the connection may have committed, marking items dispatched that
        this daemon never saw, so never sent: the kernel puts them back, and they go out now
        instead of ending unknown when the job is claimed again."""
        if not self._jobs:
            return
        known = [item_id for job in self._jobs.values() for item_id in (*job.handed, *job.waiting)]
        now = time.monotonic()
        rows = kernel.undispatch_items(self.config.worker_id, list(self._jobs), known, self.config.tenant_ids)
        for row in rows:
            item = Item(*row)
            self._jobs[item.job_id].waiting[item.id] = (item, now)
        if rows:
            log.warning("%d items marked dispatched by a step whose answer was lost were never sent:"
                        " sending them now", len(rows))

    def _listen(self) -> None:
        """Set the wake-up on every NOTIFY; reconnects by itself. Polling covers the gaps."""
        while not self.stop.is_set():
            try:
                with connect(self.config.listen_dsn or self.config.dsn, autocommit=True) as conn:
                    listen(conn)
                    while not self.stop.is_set():
                        for _ in conn.notifies(timeout=0.5, stop_after=1):
                            self._notified = True
                            self._wake.set()
            except (psycopg.Error, DatabaseUnreachable) as exc:
                log.warning("listener connection lost (polling meanwhile): %s", exc)
                self.stop.wait(self.config.poll_interval)

    def request_stop(self) -> None:
        """Stop claiming; finish in-flight calls within the grace period; release; return."""
        self.stop.set()
        self._wake.set()

    def _stop_expired(self) -> bool:
        return self._stop_at is not None and time.monotonic() - self._stop_at > self.config.grace_seconds

    # --- the main loop --------------------------------------------------------------------

    def _loop(self, kernel: Kernel) -> bool:
        """Returns True when the daemon is done (stopped, or idle with until_idle)."""
        stepper = Stepper(kernel, self._wake)
        try:
            while True:
                self._wake.clear()
                self._collect()
                if self._take_answers(kernel, stepper):
                    return True
                now = time.monotonic()
                if self.stop.is_set() and self._stop_at is None:
                    self._stop_at = now
                if self._stop_at is not None and not self._submitted and (
                        self._in_flight == 0 or self._stop_expired()):
                    self._shut_down(kernel)
                    return True
                if len(self._submitted) < self._steps_in_flight:
                    if self._gather(now):
                        continue
                    request = self._request(now)
                    if request is not None:
                        self._submit(stepper, request)
                        continue
                self._wake.wait(self._sleep(now))
        finally:
            stepper.close()
            # A step that never answered (the loop raised) gives back what it carried.
            while self._submitted:
                self._give_back(self._submitted.popleft())

    def _submit(self, stepper: Stepper, request: StepRequest) -> None:
        ending = [self._jobs[job_id] for job_id in (*request.complete, *request.fail)]
        for job in ending:
            job.ending = True
        result_jobs = [job for job, _ in self._unrecorded]
        for job in result_jobs:
            job.submitted += 1
        redispatched = []
        taken = set(request.redispatch)
        for job in self._jobs.values():
            for item_id in [item_id for item_id in job.waiting if item_id in taken]:
                item, ready = job.waiting.pop(item_id)
                redispatched.append((job, item, ready))
        self._unrecorded = []
        self._submitted.append(Submitted(request, result_jobs, redispatched, ending))
        stepper.submit(request)
        STEPS.inc()

    def _settle(self, submitted: Submitted) -> None:
        for job in submitted.result_jobs:
            job.submitted -= 1
        for job in submitted.ending:
            job.ending = False

    def _give_back(self, submitted: Submitted) -> None:
        """A step that did not run (or whose answer never came): its results are recorded by a
        later step, its waiting items wait again."""
        self._settle(submitted)
        self._unrecorded[:0] = zip(submitted.result_jobs, submitted.request.results, strict=True)
        for job, item, ready in submitted.redispatched:
            job.waiting[item.id] = (item, ready)

    def _take_answers(self, kernel: Kernel, stepper: Stepper) -> bool:
        """Apply the steps that answered, in order; True when until_idle finds nothing left.
        After a failure, raise it once every step behind it has answered too."""
        while True:
            try:
                request, answer = stepper.answers.get_nowait()
            except Empty:
                return False
            submitted = self._submitted.popleft()
            assert submitted.request is request
            if isinstance(answer, BaseException) or answer is Stepper.NOT_RUN:
                self._give_back(submitted)
                if isinstance(answer, BaseException):
                    self._failure = answer
                if not self._submitted:
                    failure, self._failure = self._failure, None
                    assert failure is not None
                    raise failure
                continue
            self._settle(submitted)
            self._last_step = time.monotonic()
            if self._apply(kernel, request, answer):
                return True

    def _gather(self, now: float) -> bool:
        """Wait a moment for more calls to finish when some are back and others are about to
        be: one step then records them all (fast providers answer within microseconds of each
        other). True when it waited (look again)."""
        if not self._unrecorded or self._in_flight == 0 or self._stop_at is not None:
            self._first_result_at = None
            return False
        if self._first_result_at is None:
            self._first_result_at = now
        left = self._first_result_at + GATHER_S - now
        if left <= 0 or len(self._unrecorded) >= self._in_flight:
            self._first_result_at = None
            return False
        self._wake.wait(left)
        return True

    def _request(self, now: float) -> StepRequest | None:
        """The next step, or None when there is nothing worth a round trip yet."""
        stopping = self._stop_at is not None
        # What the steps not answered yet may dispatch is taken already; one step takes at
        # most its share of the window, so the next one has room while it runs.
        reserved = sum(s.request.want for s in self._submitted)
        free = 0 if stopping else min(self.config.concurrency - self._in_flight - reserved, self._step_share)
        free = max(free, 0)
        redispatch = []
        for job in self._jobs.values():
            if not (job.cancelled or job.error):
                redispatch += [item.id for item, ready in job.waiting.values() if ready <= now]
        redispatch = redispatch[:free]
        remaining = sum(job.remaining for job in self._jobs.values() if not (job.cancelled or job.error))
        claim = 0
        needed = free - remaining - len(redispatch)
        claiming = any(s.request.claim for s in self._submitted)
        if not stopping and not claiming and needed > 0 and (self._notified or now >= self._next_claim):
            # Enough jobs to fill the window, judged by the size of the jobs claimed lately:
            # one big batch job, or many one-contact jobs at once.
            claim = min(math.ceil(needed / self._job_size), 1000)
        complete = [job.id for job in self._jobs.values() if job.finished and not job.error]
        fail = {job.id: job.error for job in self._jobs.values()
                if job.error and job.in_flight == 0 and job.submitted == 0 and not job.ending}
        dispatch = free > 0 and (remaining > 0 or redispatch) and now >= self._rate_until
        renew = (bool(self._jobs) and not self._submitted
                 and now - self._last_step >= self.config.lease_seconds / 6)
        if not (self._unrecorded or complete or fail or redispatch or dispatch or claim or renew):
            return None
        return StepRequest(
            worker=self.config.worker_id, lease_seconds=self.config.lease_seconds,
            tenant_ids=self.config.tenant_ids, held=list(self._jobs),
            results=[result for _, result in self._unrecorded],
            complete=complete, fail=fail, redispatch=redispatch,
            want=free if (dispatch or claim) else len(redispatch), claim=claim,
            deduplicating=self._deduplicating,
        )

    def _sleep(self, now: float) -> float:
        """How long nothing needs a step: until a retry is due, a lease wants renewing, or the
        next look for work (a result or a NOTIFY wakes the loop earlier)."""
        deadlines = [now + self.config.poll_interval, self._next_claim, self._rate_until]
        if self._jobs:
            deadlines.append(self._last_step + self.config.lease_seconds / 6)
        deadlines += [ready for job in self._jobs.values() for _, ready in job.waiting.values()]
        if self._stop_at is not None:
            deadlines.append(self._stop_at + self.config.grace_seconds)
        # Deadlines already past wait for a free slot, which a finished call signals.
        return min((deadline for deadline in deadlines if deadline > now), default=now) - now

    def _apply(self, kernel: Kernel, request: StepRequest, rows: list[StepRow]) -> bool:
        """Act on what the step returned; True when until_idle finds nothing left."""
        now = time.monotonic()
        if request.claim:
            self._notified = False
        claimed = []
        ended: set[Id] = set()
        retried: set[Id] = set()
        for row in rows:
            kind = row.kind
            job = self._jobs.get(row.job_id) if row.job_id else None
            if kind == "item" and job is not None:
                self._dispatch(job, _item(row))
            elif kind == "held" and job is not None:
                job.remaining = row.detail["remaining"]
            elif kind == "job":
                claimed.append(max(1, row.detail["remaining"]))
                self._hold(row)
            elif kind == "waiting" and job is not None:
                retried.add(job.id)
                count = row.detail["dispatch_count"]
                item = _item(row)
                job.waiting[item.id] = (item, now + RETRY_BACKOFF_S[min(count, len(RETRY_BACKOFF_S) - 1)])
            elif kind == "done" and job is not None:
                ended.add(job.id)
                self._end(job, row.detail)
            elif kind == "paused" and job is not None:
                # Outside its send window: the kernel holds it, scheduled, until the window opens.
                del self._jobs[job.id]
                log.info("job paused job=%s: %s", job.id, row.detail["reason"], extra=_fields(job))
            elif kind == "cancelled" and job is not None:
                job.cancelled = True
                job.waiting.clear()
            elif kind == "lost" and job is not None:
                LEASE_LOSSES.inc()
                del self._jobs[job.id]
                log.warning("lease lost job=%s: another worker holds it or it ended", job.id,
                            extra=_fields(job))
            elif kind == "wait":
                self._rate_until = now + float(row.detail["seconds"])
            elif kind == "stale":
                log.warning("result for item %s not recorded: it is %s", row.item_id, row.detail)
            elif kind == "idle":
                self._publish_queue_metrics(kernel)
                if (self.config.until_idle and not self._in_flight and not self._unrecorded
                        and not self._submitted):
                    if not row.detail["queued"] and not row.detail["processing"]:
                        log.info("no work left", extra={"worker": self.config.worker_id})
                        return True
                    # Another daemon's job may still end or expire: look again soon.
                    self._next_claim = now + min(self.config.poll_interval, 0.1)
                    continue
        if claimed:
            # Jobs of several sizes (a tenant's batches beside other tenants' one-contact
            # campaigns): a one-contact claim must not make the next claim take hundreds of
            # batches, which would hold them ahead of every later job. Shrink by halves at most.
            self._job_size = max(sum(claimed) / len(claimed), self._job_size / 2)
        if request.claim:
            if len(claimed) < request.claim:
                self._next_claim = now + self.config.poll_interval
            else:
                self._notified = True  # more may be queued
        self._release_stuck(kernel, request, ended | retried)
        return False

    def _release_stuck(self, kernel: Kernel, request: StepRequest, settled: set[Id]) -> None:
        """A job this daemon finished that the kernel would not end, twice, is in a state the
        daemon does not know: items dispatched by a step whose commit it never saw (a connection
        lost mid-call; those items were never sent) or a snapshot the kernel refuses to close.
        Release it: its next holder settles the items by the contract, and the kernel fails
        the job after max_attempts."""
        stuck = []
        for job_id in request.complete:
            job = self._jobs.get(job_id)
            if job is None:
                continue
            if job_id in settled:  # a retry came back: the job is not finished after all
                job.complete_asked = False
                continue
            if job.complete_asked:
                stuck.append(job_id)
                log.warning("job %s: the kernel would not end it; releasing it for another attempt",
                            job_id, extra=_fields(job))
            job.complete_asked = True
        if stuck:
            kernel.release_jobs(self.config.worker_id, stuck, "the kernel would not end the job",
                                self.config.tenant_ids)
            for job_id in stuck:
                del self._jobs[job_id]

    def _shut_down(self, kernel: Kernel) -> None:
        """Record what came back, end what is finished, give the rest back to the queue."""
        if self._in_flight:
            log.warning("grace period over: %d provider calls abandoned", self._in_flight)
        request = self._request(time.monotonic())
        if request is not None:
            rows = kernel.worker_step(request)
            self._unrecorded = []
            self._apply(kernel, request, rows)
        if self._jobs:
            released = kernel.release_jobs(
                self.config.worker_id, list(self._jobs), f"released by {self.config.worker_id} on shutdown",
                self.config.tenant_ids,
            )
            log.info("%d jobs released (shutdown)", released)
            self._jobs.clear()

    # --- jobs and items -------------------------------------------------------------------

    def _hold(self, row: StepRow) -> None:
        context = row.detail
        assert row.job_id is not None and row.run_id is not None
        job = HeldJob(
            id=row.job_id, run_id=row.run_id, attempt=context["attempts"], channel=context["channel"],
            provider=context["provider"], content=context.get("content"), remaining=context["remaining"],
        )
        try:
            job.adapter = self._adapter(job.provider, context.get("provider_settings") or {})
        except ProviderConfigError as exc:
            job.error = str(exc)
            log.error("job failed job=%s: %s", job.id, exc, extra=_fields(job))
        self._jobs[job.id] = job
        JOBS_CLAIMED.inc()
        if job.attempt > 1:
            JOBS_RECLAIMED.inc()
        # One line per job only at DEBUG: a daemon draining one-contact campaigns claims
        # thousands a second, and at INFO those lines cost more than the jobs' SQL (docs/runbook.md).
        # A job claimed again (its holder died or gave it back) is worth an INFO line.
        level = logging.INFO if job.attempt > 1 else logging.DEBUG
        if log.isEnabledFor(level):
            log.log(level, "job claimed job=%s run=%s attempt=%s", job.id, job.run_id, job.attempt, extra=_fields(job))

    def _dispatch(self, job: HeldJob, item: Item) -> None:
        job.handed.add(item.id)
        if job.error is not None:
            # Dispatched by the same step that claimed the job, but never sent.
            self._unrecorded.append((job, Result(item.id, "failed", None, None, job.error)))
            return
        job.in_flight += 1
        self._in_flight += 1
        assert job.adapter is not None
        started = time.perf_counter()
        if not job.adapter.send_later(_outbound(job, item), lambda result: self._finished(job, item, started, result)):
            self._tasks.put((job, item))  # the adapter's calls block: a provider thread makes it

    def _end(self, job: HeldJob, detail: dict[str, Any]) -> None:
        del self._jobs[job.id]
        run_status = detail["run_status"]
        if log.isEnabledFor(logging.DEBUG):
            log.debug("job %s job=%s", detail["job_status"], job.id, extra=_fields(job))
        if run_status in TERMINAL_RUN_STATUSES:
            log.info("run %s run=%s", run_status, job.run_id, extra={**_fields(job), "run_status": run_status})

    def _collect(self) -> None:
        """Take the outcomes the provider threads finished since the last look."""
        while True:
            try:
                job, item, result = self._done.get_nowait()
            except Empty:
                return
            self._in_flight -= 1
            job.in_flight -= 1
            if self._jobs.get(job.id) is not job:
                continue  # lost meanwhile: fenced, nothing is recorded for it
            assert job.adapter is not None
            outcome = outbox_outcome(result.outcome, job.adapter.deduplicates)
            job.count(outcome)
            self._unrecorded.append((job, Result(
                item.id, outcome, result.provider_message_id, response_json(result.response), result.error
            )))

    def _call_providers(self) -> None:
        """One provider thread: make the calls of adapters without send_later."""
        while (task := self._tasks.get()) is not None:
            job, item = task
            assert job.adapter is not None
            started = time.perf_counter()
            self._finished(job, item, started, job.adapter.send(_outbound(job, item)))

    def _finished(self, job: HeldJob, item: Item, started: float, result: SendResult) -> None:
        """A call ended (on a provider thread or the adapter's): time it, hand it back, wake the loop."""
        timer = self._timers.get(job.provider)
        if timer is None:
            timer = self._timers.setdefault(job.provider, CALL_SECONDS.labels(job.provider))
        timer.observe(time.perf_counter() - started)
        self._done.put((job, item, result))
        self._wake.set()

    def _adapter(self, provider: str, settings: dict[str, Any]) -> ProviderAdapter:
        key = f"{provider}:{json.dumps(settings, sort_keys=True)}"
        if key not in self._adapters:
            self._adapters[key] = open_adapter(provider, settings, concurrency=self.config.concurrency)
        return self._adapters[key]

    def _publish_queue_metrics(self, kernel: Kernel) -> None:
        if not self.config.metrics_port:
            return
        depth = {q.status: q for q in kernel.queue_stats()}
        for status in ("queued", "processing"):
            entry = depth.get(status)
            QUEUE_JOBS.labels(status).set(entry.jobs if entry else 0)
            QUEUE_OLDEST.labels(status).set(entry.oldest_age_seconds if entry else 0)


def _item(row: StepRow) -> Item:
    return Item._make(row[1:7])


def _outbound(job: HeldJob, item: Item) -> OutboundItem:
    return OutboundItem(
        id=item.id, idempotency_key=item.idempotency_key, channel=job.channel, recipient=item.recipient,
        content=job.content, run_id=item.run_id, contact_id=item.contact_id,
    )


def _fields(job: HeldJob) -> dict[str, Any]:
    return {"job_id": str(job.id), "run_id": str(job.run_id), "attempt": job.attempt}


def _deduplicates(provider: str) -> bool:
    try:
        return load_adapter(provider).deduplicates
    except ProviderConfigError:
        return False  # cannot be loaded: its jobs fail with the reason when claimed


@contextmanager
def stop_on_signals(stop: Callable[[], None]) -> Iterator[None]:
    """SIGTERM/SIGINT call `stop` (drain, release, exit 0); the old handlers come back after."""

    def stop_for(name: str) -> None:
        log.info("signal %s: finishing in-flight calls, then stopping", name)
        stop()

    def handler(signum: int, _frame: object) -> None:
        # The handler runs in the main thread between two bytecodes, maybe while the loop holds
        # the lock of the Event that `stop` sets (inside _wake.clear() or _wake.wait()): setting
        # it, or logging, from here could wait for this very thread. A thread of its own cannot.
        name = signal.Signals(signum).name
        threading.Thread(target=stop_for, args=(name,), name=f"stop-on-{name}", daemon=True).start()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
