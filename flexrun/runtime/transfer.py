"""Copies between host memory and the compute device, as FlexGen schedules them.

Each kind of transfer has a CUDA stream of its own (``LANES``: the weights in, the KV cache in and out, the
activations in and out), and each copy is ordered by events after the compute that
produced its source or last read its destination, so the next micro-batch's cache and activations move while
the current one computes. Host buffers the copies touch are page-locked (``cudaHostRegister`` on an ordinary
allocation: exact sizes, where torch's pinned allocator rounds each one up to a power of two), so the copies
run on the copy engines asynchronously.

With overlap off (``--no-overlap``, the sequential reference) a copy runs on the compute stream itself and
is complete, for the host too, when it returns: no side stream, no event. On a CPU the device *is* host
memory: nothing is staged, and a copy is an ordinary copy, complete when it returns. ``STAGE_ON_CPU`` (for tests) makes a CPU engine stage as a GPU one does, "device" buffers being
other host tensors, so every path but the streams and events runs on a machine without CUDA.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from flexrun import diskio

log = logging.getLogger(__name__)

#: Tests set this to run a CPU engine's cache and activations through the staging paths a GPU takes.
STAGE_ON_CPU = False

LANES = ("weights", "cache_in", "cache_out", "acts_in", "acts_out")

#: A CUDA event, or None where the work it would mark is already complete (a CPU).
Event = Any


def separate(device: torch.device) -> bool:
    """Whether ``device``'s memory is apart from the host's, so that data off it is staged through copies."""
    return device.type == "cuda" or (STAGE_ON_CPU and device.type == "cpu")


class Mover:
    """The compute device's side streams, the events that order them, and its page-locked host buffers."""

    def __init__(self, device: torch.device, overlap: bool = True) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.streams = self.cuda and overlap  # copies on side streams, ordered by events
        self.separate = separate(device)
        self._streams: dict[str, Any] = {}
        self._registered: list[int] = []  # host addresses page-locked by cudaHostRegister

    def _stream(self, lane: str) -> Any:
        if lane not in self._streams:
            self._streams[lane] = torch.cuda.Stream(self.device)
        return self._streams[lane]

    def mark(self) -> Event:
        """An event after all the work enqueued on the compute stream so far (None without side streams)."""
        if not self.streams:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def copy(self, lane: str, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], after: Sequence[Event] = ()) -> Event:
        """Copy each (dst, src) on ``lane``'s stream once the events ``after`` have happened; returns the event
        that marks the copies' end (None without side streams, where they are complete on return)."""
        # Inference mode is per thread: an I/O thread copying into a tensor the step made needs it too.
        with torch.inference_mode():
            return self._copy(lane, pairs, after)

    def _copy(self, lane: str, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], after: Sequence[Event]) -> Event:
        if not self.streams:
            for dst, src in pairs:
                dst.copy_(src)  # on the compute stream; a copy to or from the host waits for it
            return None
        stream = self._stream(lane)
        with torch.cuda.stream(stream):
            for event in after:
                if event is not None:
                    stream.wait_event(event)
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
                for t in (dst, src):
                    if t.is_cuda:  # the allocator must not reuse it until this stream is done with it
                        t.record_stream(stream)
            done = torch.cuda.Event()
            done.record(stream)
        return done

    def wait(self, event: Event) -> None:
        """Make the compute stream wait for ``event`` (no host wait)."""
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    @staticmethod
    def sync(event: Event) -> None:
        """Block this host thread until ``event`` has happened."""
        if event is not None:
            event.synchronize()

    def host_buffer(self, nbytes: int, pin: bool = True) -> torch.Tensor:
        """A page-aligned uint8 host buffer of ``diskio.padded(nbytes)`` bytes, page-locked on CUDA when ``pin``."""
        buf = diskio.aligned_empty(nbytes)
        if self.cuda and pin:
            self._register(buf)
        return buf

    def host_zeros(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """``numel`` zeros of ``dtype`` in a host buffer that copies to and from the device run asynchronously from."""
        return self.host_buffer(numel * dtype.itemsize).zero_()[: numel * dtype.itemsize].view(dtype)

    def _register(self, buf: torch.Tensor) -> None:
        # A buffer left pageable is still correct: only the copies from it wait for the host.
        try:
            cudart = torch.cuda.cudart()
            err = cudart.cudaHostRegister(buf.data_ptr(), buf.numel(), 0)
            ok = err == cudart.cudaError.success
        except (AttributeError, RuntimeError) as exc:
            ok, err = False, exc
        if not ok:
            log.warning("cudaHostRegister of %d bytes failed (%s): copies from it will not overlap", buf.numel(), err)
            return
        self._registered.append(buf.data_ptr())

    def close(self) -> None:
        """Wait for the device's work and unlock the host buffers (before they are freed)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        if self._registered:
            cudart = torch.cuda.cudart()
            for ptr in self._registered:
                cudart.cudaHostUnregister(ptr)
            self._registered.clear()
