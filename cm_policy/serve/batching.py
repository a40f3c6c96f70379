"""Micro-batching: one worker thread runs queued inference requests, several per forward pass.

The event loop only decodes, validates and queues; the worker thread takes the first queued
request, then waits at most ``wait_s`` after its arrival for requests of other active sessions
(never when it is the only active one), and runs them as one batch of at most ``max_batch`` rows.

Unseeded requests with the same number of steps share one ``predict_action`` call on their
concatenated windows, their noise drawn from the backend's generator. A request with its own seed
runs in a pass of its own with the backend's generator for that seed (torch:
``torch.Generator().manual_seed(seed)``; onnx: the same noise drawn with numpy): with the torch
backend its actions are then bitwise those of the in-process policy called with that generator on
the same window, whatever else is queued (a batched pass would agree only to float rounding, as
kernels sum in a different order at another batch size, and a method may draw noise for the
batch as a whole).

This module imports no torch: the backend brings its runtime.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from cm_policy.observations import ActionRefused

Predict = Callable[..., np.ndarray]
_STOP = object()


def torch_generator(seed: int) -> Any:
    """``torch.Generator().manual_seed(seed)``: the noise source of a seeded request of a torch
    policy (imported here only when a seeded request comes)."""
    import torch

    return torch.Generator().manual_seed(seed)


class InferenceError(RuntimeError):
    """The policy raised while running a request's pass."""


@dataclass
class InferResult:
    action: np.ndarray
    queue_ms: float
    compute_ms: float
    batch_rows: int
    batch_requests: int


@dataclass
class InferRequest:
    """One session's window (B, n_obs_steps, ...) and sampling settings, settled on its loop."""

    window: dict[str, np.ndarray]
    steps: int | None
    seed: int | None
    received: float
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    sampler: str | None = None

    @property
    def rows(self) -> int:
        return len(next(iter(self.window.values())))

    def settle(self, outcome: InferResult | BaseException) -> None:
        self.loop.call_soon_threadsafe(_settle, self.future, outcome)


def _settle(future: asyncio.Future, outcome: InferResult | BaseException) -> None:
    if future.done():  # cancelled: its client left while it was queued or running
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


class MicroBatcher:
    """Runs ``predict(window, steps=, generator=, sampler=)`` on a worker thread over queued
    requests; a seeded request's ``generator`` is ``seeded(seed)``."""

    def __init__(
        self,
        predict: Predict,
        *,
        max_batch: int,
        wait_s: float,
        active_sessions: Callable[[], int],
        seeded: Callable[[int], Any] = torch_generator,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if wait_s < 0:
            raise ValueError(f"the batch wait must be >= 0 s, got {wait_s}")
        self.predict = predict
        self.seeded = seeded
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.active_sessions = active_sessions
        self.requests = 0
        self.passes = 0
        self.refused = 0  # requests refused: out-of-range observations or non-finite actions
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="inference", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: InferRequest) -> None:
        self._queue.put(request)

    def stop(self) -> None:
        """Finish what is queued, then end the worker thread."""
        self._queue.put(_STOP)
        self._thread.join()

    def _work(self) -> None:
        carry = None
        while True:
            first = carry if carry is not None else self._queue.get()
            carry = None
            if first is _STOP:
                return
            batch, rows = [first], first.rows
            deadline = first.received + self.wait_s
            while rows < self.max_batch:
                # Every active session already has its request in: nothing more to wait for.
                wait = deadline - time.perf_counter()
                if len(batch) >= self.active_sessions():
                    wait = 0.0
                try:
                    item = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP or rows + item.rows > self.max_batch:
                    carry = item
                    break
                batch.append(item)
                rows += item.rows
            self._run(batch)

    def _run(self, batch: list[InferRequest]) -> None:
        shared: dict[tuple[int | None, str | None], list[InferRequest]] = {}
        for request in batch:
            if request.future.cancelled():
                continue
            setting = (request.steps, request.sampler)
            if request.seed is None:
                shared.setdefault(setting, []).append(request)
            else:
                self._forward([request], setting, self.seeded(request.seed))
        for setting, requests in shared.items():
            self._forward(requests, setting, None)

    def _forward(
        self,
        requests: list[InferRequest],
        setting: tuple[int | None, str | None],
        generator: Any,
    ) -> None:
        steps, sampler = setting
        started = time.perf_counter()
        try:
            action = self.predict(
                _concat([r.window for r in requests]),
                steps=steps,
                generator=generator,
                sampler=sampler,
            )
        except ActionRefused as exc:  # refuse the requests with a bad row, answer the others
            action, reasons = np.asarray(exc.actions), exc.reasons
        except Exception as exc:  # a failed pass fails its requests, never the worker
            for request in requests:
                request.settle(InferenceError(f"inference failed: {exc}"))
            return
        else:
            reasons = [None] * len(action)
        compute_ms = (time.perf_counter() - started) * 1e3
        self.requests += len(requests)
        self.passes += 1
        offset = 0
        for request in requests:
            refused = [r for r in reasons[offset : offset + request.rows] if r]
            if refused:
                self.refused += 1
                request.settle(InferenceError(f"actions refused: {refused[0]}"))
                offset += request.rows
                continue
            request.settle(
                InferResult(
                    action=action[offset : offset + request.rows],
                    queue_ms=(started - request.received) * 1e3,
                    compute_ms=compute_ms,
                    batch_rows=len(action),
                    batch_requests=len(requests),
                )
            )
            offset += request.rows


def _concat(windows: list[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(windows) == 1:
        return dict(windows[0])
    return {k: np.concatenate([w[k] for w in windows]) for k in windows[0]}
