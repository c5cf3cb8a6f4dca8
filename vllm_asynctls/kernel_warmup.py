"""Kernel warm-ups run once before serving. Triton compiles a kernel variant at its first launch, and a
variant first launched while serving stalls that step (vLLM logs it as "JIT compilation during inference",
about 1 s on an H200). The GPU layers therefore launch every variant they can take at their first call
outside a CUDA-graph capture (vLLM's warm-up runs, before capture): the index writer's size classes
(`warm_write_index`) and the decode attention's plans (`warm_decode_attention`)."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (a warm-up would launch into it)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def tensor_layout(t: torch.Tensor | None) -> tuple | None:
    """What of a tensor a compiled variant can depend on besides its data: dtype, shape and strides."""
    return None if t is None else (t.dtype, tuple(t.shape), t.stride())


def fields_layout(obj) -> tuple:
    """A dataclass's fields, each tensor as its `tensor_layout`."""
    return tuple(tensor_layout(v) if isinstance(v, torch.Tensor) else v
                 for v in (getattr(obj, f.name) for f in dataclasses.fields(obj)))


def row_layout(t: torch.Tensor | None) -> tuple | None:
    """`tensor_layout` without the leading dimension, for a call's rows (tokens, sequences, cache blocks),
    whose count each launch passes as an argument."""
    return None if t is None else (t.dtype, tuple(t.shape[1:]), t.stride())


class WarmOnce:
    """One layer's warm-up of one kind: `warm_once(layout, warm)` runs `warm()` at the layer's first call
    outside a CUDA-graph capture, unless a layer of this process already warmed the same `layout()` (Triton's
    compiled kernels are per process, so the same layouts compile nothing new). Later calls, and calls while
    capturing, do nothing; neither callable runs then, so a call on the hot path costs an attribute check
    (and the caller's two closures).
    `layout()` must hold everything the kernels specialise on: the kind of warm-up first, then dtypes,
    shapes, strides, settings."""

    _warmed_layouts: set[tuple] = set()  # per process, shared by every layer and kind

    def __init__(self) -> None:
        self.done = False

    def __call__(self, layout: Callable[[], tuple], warm: Callable[[], None]) -> None:
        if self.done or capturing():
            return
        key = layout()
        if key not in WarmOnce._warmed_layouts:
            warm()
            WarmOnce._warmed_layouts.add(key)
        self.done = True
