"""Shutting down the tests' in-process vLLM engines (one helper instead of a copy per test file)."""

from __future__ import annotations

import gc


def shutdown_engine(llm) -> None:
    """Stop `llm`'s engine core (and its worker processes) now instead of at garbage collection, so the
    next engine of the session starts on a free machine. Best effort: the processes also go away with
    the object."""
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001 - an engine that failed half-way has nothing left to stop
        pass
    gc.collect()
