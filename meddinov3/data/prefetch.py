"""Background batch prefetch: while step k runs, a worker thread draws the batches of the next steps, pins them and
copies them to the device, so the device does not wait for the sampler.

The sampler is a pure function of the step, so a prefetched batch is identical to one drawn inline, and starting at
any step (resume) gives the batches an uninterrupted run would have had.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable

import numpy as np
import torch

Batch = tuple[torch.Tensor, torch.Tensor]


class Prefetcher:
    """`get(step)` returns the (images, labels) of `sample(step)` on `device`, for steps start, start + 1, ...

    depth > 0: a worker thread stays up to `depth` batches ahead (bounded queue); depth 0: each batch is loaded
    inline by `get`. On CUDA the host arrays are pinned and copied with non_blocking=True on a side stream; the
    consuming stream waits for the copy's event. Use as a context manager, or call `close()`: it stops and joins
    the worker. An exception in the worker is raised again by the `get` that would have returned its batch.
    """

    def __init__(self, sample: Callable[[int], tuple[np.ndarray, np.ndarray]], start: int, device, depth: int = 2):
        self.sample = sample
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        if self._cuda and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._stream = torch.cuda.Stream(self.device) if self._cuda and depth else None
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._closing = threading.Event()
        self._thread = None
        if depth:
            self._thread = threading.Thread(target=self._work, args=(int(start),), name="meddinov3-prefetch",
                                            daemon=True)
            self._thread.start()

    def _load(self, step: int):
        imgs, labs = self.sample(step)
        x, y = torch.from_numpy(imgs), torch.from_numpy(labs)
        if not self._cuda:
            return x.to(self.device), y.to(self.device), None
        stream = self._stream or torch.cuda.current_stream(self.device)
        with torch.cuda.stream(stream):
            x = x.pin_memory().to(self.device, non_blocking=True)
            y = y.pin_memory().to(self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(stream)
        return x, y, ready

    def _work(self, step: int) -> None:
        try:
            if self._cuda:  # the current device is per thread: without this, pinning would open a context on GPU 0
                torch.cuda.set_device(self.device)
            while self._put((step, self._load(step))):
                step += 1
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            self._put((step, e))

    def _put(self, item) -> bool:
        """Queue `item` once there is room; False when closing."""
        while not self._closing.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self, step: int) -> Batch:
        if self._thread is None:
            x, y, ready = self._load(step)
        else:
            got, item = self._queue.get()
            if isinstance(item, BaseException):
                self.close()
                raise item
            if got != step:
                raise RuntimeError(f"prefetcher holds the batch of step {got}, step {step} was asked for "
                                   "(steps must be consumed in order)")
            x, y, ready = item
        if ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(ready)
            x.record_stream(current)  # memory allocated on the side stream, used on this one
            y.record_stream(current)
        return x, y

    def close(self) -> None:
        """Stop and join the worker; drop the batches it drew ahead. Safe to call twice."""
        self._closing.set()  # the worker notices within 0.1 s, or when the batch it is drawing is done
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        while not self._queue.empty():
            self._queue.get_nowait()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
