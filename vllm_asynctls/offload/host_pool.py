"""`HostKVPool`: the whole K/V of the long requests, per layer, in (pinned) host memory.

Layout: `data` is (num_layers, 2, num_blocks, Hkv, block_size, D) in the model dtype; index 0 of
the second dim is K, 1 is V. One (block, kv head) row is `block_size * D` contiguous elements
(16 KiB for block 64, D 128, bf16), the unit the prefetcher copies: the AsyncTLS selection is per
kv head, so a head's block is fetched without its neighbours.

Blocks are handed out by a host-side free list (`allocate` / `free`), called at admission and at
request end, never on the decode path. A request's logical block j lives in host block
`host_block_table[row, j]` (an int32 tensor the caller owns, like vLLM's block table).

Start-up failures raise `RuntimeError` naming the bytes asked and the bytes available (psutil's
`available`, else `os.sysconf` free pages): a pool larger than free RAM, an allocation that fails, and
pinning without CUDA or a `cudaHostAlloc` that fails.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

__all__ = ["HostKVPool", "host_memory_available"]


def host_memory_available() -> int:
    """Bytes of host RAM available to a new allocation (psutil, else os.sysconf)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # psutil ships with vLLM; os.sysconf is the fallback on bare machines
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _gib(n: int) -> str:
    return f"{n} B ({n / 2**30:.2f} GiB)"


class HostKVPool:
    """Host-resident K/V blocks for every layer.

    num_layers, num_blocks, block_size, num_kv_heads, head_dim: the pool's shape (see module doc).
    pin: "auto" pins when CUDA is available; True requires it (RuntimeError otherwise); False never.
    headroom: share of available RAM the pool may take (the rest stays for the process and others).
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.bfloat16, pin: bool | str = "auto", headroom: float = 0.9) -> None:
        for name, value in (("num_layers", num_layers), ("num_blocks", num_blocks), ("block_size", block_size),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"HostKVPool {name} must be an int >= 1; got {value!r}")
        if pin not in (True, False, "auto"):
            raise ValueError(f"HostKVPool pin must be True, False or 'auto'; got {pin!r}")
        if not 0.0 < headroom <= 1.0:
            raise ValueError(f"HostKVPool headroom must be in (0, 1]; got {headroom!r}")
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim, self.dtype = num_kv_heads, head_dim, dtype
        shape = (num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim)
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.nbytes = itemsize
        for s in shape:
            self.nbytes *= s
        available = host_memory_available()
        if self.nbytes > headroom * available:
            raise RuntimeError(
                f"KV offload host pool: asked for {_gib(self.nbytes)} of host memory "
                f"({num_layers} layers x {num_blocks} blocks x {num_kv_heads} kv heads x {block_size} tokens x "
                f"{head_dim} x 2 (K, V) x {itemsize} B), but only {_gib(available)} is available "
                f"(the pool may take {headroom:.0%} of it). Lower offload_host_blocks (or the number of long "
                f"requests offloaded at once), or free host memory"
            )
        want_pin = torch.cuda.is_available() if pin == "auto" else bool(pin)
        if want_pin and not torch.cuda.is_available():
            raise RuntimeError(
                f"KV offload host pool: pinning {_gib(self.nbytes)} needs CUDA, which is not available "
                f"(available host memory {_gib(available)}). Pass pin=False (CPU runs) or run on a GPU machine"
            )
        try:
            self.data = torch.empty(shape, dtype=dtype, pin_memory=want_pin)  # (L, 2, NB, Hkv, bs, D)
        except (RuntimeError, MemoryError) as e:
            what = "allocate and pin" if want_pin else "allocate"
            raise RuntimeError(
                f"KV offload host pool: could not {what} {_gib(self.nbytes)} of host memory "
                f"({_gib(available)} available): {e}"
            ) from None
        self.pinned = want_pin
        self._free = list(range(num_blocks - 1, -1, -1))  # stack: pops give ascending ids

    # --- block bookkeeping (scheduler side, host integers) ---------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"KV offload host pool: {n} blocks asked, {len(self._free)} free of {self.num_blocks}")
        return [self._free.pop() for _ in range(n)]

    def free(self, block_ids: list[int]) -> None:
        self._free.extend(reversed(block_ids))

    @property
    def block_bytes(self) -> int:
        """Bytes of one (block, kv head) row of K plus V: what one missed block costs to copy."""
        return 2 * self.block_size * self.head_dim * self.data.element_size()

    # --- data ------------------------------------------------------------------------------------
    def layer(self, layer: int) -> tuple[Tensor, Tensor]:
        """(K, V) of one layer, each (num_blocks, Hkv, block_size, D), views of the pool."""
        return self.data[layer, 0], self.data[layer, 1]

    def write_tokens(self, layer: int, host_block_table: Tensor, positions: Tensor, key: Tensor,
                     value: Tensor) -> None:
        """Write-through of new tokens of one request (prefill chunk or decode token).

        host_block_table: (W,) int32 host block of each logical block of the request;
        positions: (N,) logical positions; key, value: (N, Hkv, D) (any device: copied to host here,
        which synchronises on a GPU source; prefill-time only, the decode path writes through
        the hot cache's tail block, see the package doc).
        """
        pos = positions.long().cpu()
        blocks = host_block_table.long().cpu()[pos // self.block_size]  # (N,)
        offs = pos % self.block_size
        k_host, v_host = self.layer(layer)
        k_host[blocks, :, offs] = key.to("cpu", self.dtype)  # (N, Hkv, D) at [block, :, offset]
        v_host[blocks, :, offs] = value.to("cpu", self.dtype)
