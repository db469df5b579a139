# Polling and long polling: POST /v1/jobs starts a completion in the background; GET reads its events after a cursor.
"""A job is a completion that runs whether or not anyone is connected::

    POST /v1/jobs {"prompt": "def f(", "max_tokens": 32}     -> {"id": "job-...", "status": "queued", ...}
    GET  /v1/jobs/{id}?after=K                                -> events with sequence_number > K, and "cursor"
    GET  /v1/jobs/{id}?after=K&wait=S                         -> held up to S s until there is something new
    POST /v1/jobs/{id}/cancel

Each event is one choice's new tokens and text (``sequence_number`` 1, 2, ...), so reading with ``after`` set
to the last ``cursor`` loses nothing and repeats nothing (as OpenAI's background responses resume with
``starting_after``). Statuses follow Replicate: queued, running, succeeded, failed, cancelled. A finished job
is kept ``server.job_ttl`` seconds, then answers 410 Gone; a running job nobody polled for
``server.job_idle_timeout`` seconds is cancelled (the polling client is gone) and its KV blocks freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict

from fastapi import APIRouter, Depends, Query, Request

from .auth import require_api_key
from .errors import APIError, bad_request, overloaded
from .generation import Generation, RequestStream
from .responses import Job, JobChoice, JobEvent, Usage
from .schemas import JobRequest

router = APIRouter(dependencies=[Depends(require_api_key)])
FINAL = ("succeeded", "failed", "cancelled")


class JobState:
    """One job's events, result and clocks (mutated only on the event loop)."""

    def __init__(self, job_id: str, model: str, prompt_ids: list[int], n: int):
        self.id, self.model, self.prompt_ids = job_id, model, prompt_ids
        self.created = int(time.time())
        self.status = "queued"
        self.events: list[JobEvent] = []
        self.choices = [JobChoice(index=j, text="", token_ids=[]) for j in range(n)]
        self.error: dict | None = None
        self.finished_at: float | None = None
        self.last_polled = time.monotonic()
        self.pollers = 0  # long polls waiting on it now (it is not idle while one waits)
        self.task: asyncio.Task | None = None
        self.changed = asyncio.Event()

    @property
    def done(self) -> bool:
        return self.status in FINAL

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def view(self, after: int) -> Job:
        events = self.events[after:]
        usage = None
        if self.done:
            usage = Usage.of(len(self.prompt_ids), sum(len(c.token_ids) for c in self.choices))
        return Job(id=self.id, created=self.created, model=self.model, status=self.status, events=events,
                   cursor=len(self.events),
                   choices=self.choices if self.done else None, usage=usage, error=self.error,
                   prompt_token_ids=self.prompt_ids)


class JobStore:
    """The server's jobs: started, read, cancelled, expired (see the module docstring)."""

    def __init__(self, gen: Generation):
        self.gen, self.settings = gen, gen.settings
        self.jobs: dict[str, JobState] = {}
        self.expired: OrderedDict[str, None] = OrderedDict()  # ids of expired jobs (410, not 404), bounded

    async def submit(self, body: JobRequest) -> JobState:
        gen = self.gen
        gen.check_model(body.model)
        self.sweep()
        if len(self.jobs) >= self.settings.max_jobs:
            gen.metrics.rejected.labels(gen.model_name).inc()
            raise overloaded(f"{len(self.jobs)} jobs are held (server.max_jobs={self.settings.max_jobs})")
        ids = gen.encode(body.prompts()[0])
        params = gen.params(body, gen.max_tokens_for(body.max_tokens, len(ids)))
        job_id = gen.request_id("job")
        stream = await gen.start(job_id, ids, params)
        job = JobState(job_id, gen.model_name, ids, params.n)
        self.jobs[job_id] = job
        job.task = asyncio.get_running_loop().create_task(self._run(job, stream))
        return job

    async def _run(self, job: JobState, stream: RequestStream) -> None:
        try:
            async with stream:
                async for deltas in stream:
                    job.status = "running"
                    for d in deltas:
                        choice = job.choices[d.index]
                        choice.text += d.text
                        choice.token_ids += d.token_ids
                        choice.finish_reason = d.finish_reason or choice.finish_reason
                        job.events.append(JobEvent(sequence_number=len(job.events) + 1, index=d.index, text=d.text,
                                                   token_ids=d.token_ids, finish_reason=d.finish_reason))
                    job.notify()
            aborted = any(c.finish_reason == "abort" for c in job.choices)
            job.status = "cancelled" if aborted else "succeeded"
        except asyncio.CancelledError:
            job.status = "cancelled"
        except Exception as err:  # the engine failed: the job reports it, the server goes on
            job.status = "failed"
            job.error = APIError(500, f"the engine failed: {type(err).__name__}: {err}").body()["error"]
        finally:
            job.finished_at = time.monotonic()
            job.notify()

    def get(self, job_id: str) -> JobState:
        job = self.jobs.get(job_id)
        if job is not None and job.done and time.monotonic() - job.finished_at > self.settings.job_ttl:
            self._expire(job_id)
            job = None
        if job is None:
            if job_id in self.expired:
                raise APIError(410, f"job {job_id} finished more than server.job_ttl={self.settings.job_ttl} s ago "
                                    "and its result was dropped; start a new job", param="id")
            raise APIError(404, f"no job {job_id!r}; POST /v1/jobs returns the id to poll", param="id")
        return job

    async def read(self, job_id: str, after: int, wait: float) -> Job:
        if wait > self.settings.job_max_wait:
            raise bad_request(f"wait={wait} is longer than this server holds a poll "
                              f"(server.job_max_wait={self.settings.job_max_wait}); poll again instead", "wait")
        job = self.get(job_id)
        deadline = time.monotonic() + wait
        job.pollers += 1
        try:
            while not job.done and len(job.events) <= after:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(job.changed.wait(), remaining)
        finally:
            job.pollers -= 1
            job.last_polled = time.monotonic()
        return job.view(after)

    async def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if not job.done and job.task is not None:
            job.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await job.task
        return job.view(len(job.events))

    def sweep(self) -> None:
        """Expire finished jobs past their ttl; cancel running jobs nobody polls any more."""
        now = time.monotonic()
        for job_id, job in list(self.jobs.items()):
            if job.done and now - job.finished_at > self.settings.job_ttl:
                self._expire(job_id)
            elif (not job.done and not job.pollers and now - job.last_polled > self.settings.job_idle_timeout
                  and job.task is not None):
                job.error = APIError(410, f"cancelled: not polled for server.job_idle_timeout="
                                          f"{self.settings.job_idle_timeout} s").body()["error"]
                job.task.cancel()

    def _expire(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)
        self.expired[job_id] = None
        while len(self.expired) > 16 * self.settings.max_jobs:
            self.expired.popitem(last=False)

    async def janitor(self) -> None:
        """Sweep every second (or faster when the limits are shorter), until cancelled."""
        period = min(1.0, self.settings.job_ttl / 4, self.settings.job_idle_timeout / 4)
        while True:
            await asyncio.sleep(period)
            self.sweep()

    async def close(self) -> None:
        tasks = [j.task for j in self.jobs.values() if j.task is not None and not j.task.done()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _store(request: Request) -> JobStore:
    return request.app.state.jobs


@router.post("/v1/jobs")
async def create_job(body: JobRequest, request: Request) -> Job:
    return (await _store(request).submit(body)).view(0)


@router.get("/v1/jobs/{job_id}")
async def read_job(job_id: str, request: Request, after: int = Query(0, ge=0, le=1 << 40),
                   wait: float = Query(0.0, ge=0.0, le=1e6)) -> Job:
    return await _store(request).read(job_id, after, wait)


@router.post("/v1/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, request: Request) -> Job:
    return await _store(request).cancel(job_id)
