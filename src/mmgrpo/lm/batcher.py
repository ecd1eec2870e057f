"""The batcher: program threads queue requests, one worker thread runs them in batches, one variant
(adapter) at a time, and with continuous batching refills freed slots with waiting requests.

Determinism. A row's floating-point result depends on which rows share its batch (padding,
the shared prefix, the kernel's blocking), so with batches formed by arrival time a token can
flip when the machine is busy. In deterministic mode (the default) a batch is launched only
when every program thread declared with ``clients`` is waiting on this backend, and its rows
are put in a fixed order, and a freed slot is refilled only when every such thread is decoding or
waiting: the batches are then a function of the programs alone, not of timing.
Otherwise (``deterministic=False``, e.g. a server) a batch starts after ``max_wait_s``.
"""
from __future__ import annotations

import atexit
import time
import weakref
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .base import BASE, PINNED, Completion, SamplingParams

CANCELLED = "cancelled: the run was stopped"  # the error of requests a Ctrl-C cut short
_LIVE: weakref.WeakSet = weakref.WeakSet()  # backends whose batcher may still run


@atexit.register
def _close_all() -> None:
    """Replies are delivered before the batch leaves torch, so a program can finish while its
    daemon batcher is still mid-op; tearing the interpreter down then aborts the process
    ("terminate called without an active exception"). Join every batcher first."""
    for backend in list(_LIVE):
        backend.close()


@dataclass
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    future: Future
    adapter: str | None = None  # None, BASE or an adapter name (see HFBackend._variant)

    def order(self) -> tuple:
        p = self.params
        return (self.adapter is not None, self.adapter or "", p.seed is None, p.seed or 0, p.temperature,
                p.max_tokens, self.prompt_ids)


class Clients:
    """Handle of ``HFBackend.clients``: ``leave()`` gives back one declared thread early."""

    def __init__(self, backend: "Batcher", n: int):
        self.backend, self.left = backend, n

    def leave(self) -> None:
        if self.left > 0:
            self.left -= 1
            self.backend._add_clients(-1)


class Batcher:
    """The queue and worker thread of `HFBackend` (its state is set up there); decoding is `Decoder`'s."""

    @contextmanager
    def clients(self, n: int = 1):
        """Declare n program threads at work: a deterministic batch waits for all of them to ask.
        Each thread that runs out of work calls ``leave()`` on the handle."""
        handle = Clients(self, n)
        self._add_clients(n)
        try:
            yield handle
        finally:
            self._add_clients(-handle.left)
            handle.left = 0

    def _add_clients(self, n: int) -> None:
        with self._cv:
            self._active += n
            self._cv.notify_all()

    # ---- batching -----------------------------------------------------------------------
    def close(self) -> None:
        """Stop the batching thread (it holds the model); later requests are an error."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._worker.join(timeout=30)
        self._prefix_cache.clear()

    def cancel(self) -> None:
        """Ctrl-C: fail every waiting request and refuse new ones; the batch decoding now stops at its
        next token step. The backend is closed after it."""
        with self._cv:
            self._closed = self._cancelled = True
            for r in self._pending:
                r.future.set_exception(RuntimeError(CANCELLED))
            self._pending = []
            self._cv.notify_all()

    def _next_batch(self) -> list[_Request] | None:
        """Wait for the next batch (None once closed and drained); see the module docstring."""
        with self._cv:
            first_seen = None
            while True:
                n = len(self._pending)
                if not n and self._closed:
                    return None
                if n and (self._closed or ((self.deterministic or self._active) and n >= self._active)):
                    break  # everyone at work is waiting on us (deterministic: none declared, so none to wait for)
                if n and not self.deterministic:
                    first_seen = first_seen or time.monotonic()
                    left = first_seen + self.max_wait_s - time.monotonic()
                    if n >= self.max_batch or left <= 0:
                        break
                    self._cv.wait(left)
                else:
                    self._cv.wait()
            if self.deterministic:
                self._pending.sort(key=_Request.order)
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch:]
            return batch

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            variants = list(dict.fromkeys(r.adapter for r in batch))  # in the batch's (sorted) order
            for k, adapter in enumerate(variants):  # one variant at a time
                part = [r for r in batch if r.adapter == adapter]
                if adapter not in (None, BASE, PINNED) and adapter not in self.adapters():  # unloaded while queued
                    for r in part:  # their own error; the other variants' requests go on
                        r.future.set_exception(KeyError(f"no adapter {adapter!r} is loaded (loaded: {self.adapters()})"))
                    continue
                held = sum(r.adapter in variants[k + 1:] for r in batch)  # waiting for their variant's turn
                self._generate(part, adapter, admit=self.continuous, held=held)

    def _admit(self, adapter: str | None, free: int, waiting: int, joined: list[_Request]) -> list[_Request]:
        """Waiting requests of the running variant for the slots that rows freed (continuous
        batching). Deterministic mode first waits until every declared program thread is decoding
        or waiting (``waiting``: the requests this batcher holds), so which requests join at which
        step is a function of the programs."""
        if free <= 0:
            return []
        with self._cv:
            if self.deterministic:
                while not self._closed and len(self._pending) + waiting < self._active:
                    self._cv.wait()
                self._pending.sort(key=_Request.order)
            take = [r for r in self._pending if r.adapter == adapter][:free]
            if take:
                taken = {id(r) for r in take}
                self._pending = [r for r in self._pending if id(r) not in taken]
        joined += take
        return take

    @torch.no_grad()
    def generate_batch(self, prompts: list[list[int]], params: list[SamplingParams],
                       adapter: str | None = None) -> list[Completion]:
        reqs = [_Request(list(p), sp, Future(), adapter) for p, sp in zip(prompts, params, strict=True)]
        self._generate(reqs, adapter, admit=False)
        return [r.future.result() for r in reqs]

    @torch.no_grad()
    def _generate(self, reqs: list[_Request], adapter: str | None, admit: bool, held: int = 0) -> None:
        """Decode ``reqs`` (and, with ``admit``, the requests that join them); every result or the
        error that stopped the batch reaches its request's future."""
        joined: list[_Request] = []
        try:
            if self.runs_apart(adapter):  # a copy of the weights: the live model may be updating meanwhile
                self._decode(reqs, adapter, admit, joined, held)
                return
            with self.lock, self._variant(adapter):
                was_training = self.model.training
                self.model.eval()
                try:
                    self._decode(reqs, adapter, admit, joined, held)
                finally:
                    if was_training:
                        self.model.train()
        except BaseException as exc:  # noqa: BLE001 - delivered to every caller still waiting
            for r in reqs + joined:
                if not r.future.done():
                    r.future.set_exception(exc)
