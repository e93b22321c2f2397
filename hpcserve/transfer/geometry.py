"""Geometry of a rank's paged KV cache as plain ints, and how layers split into groups. No torch.

- ``KVGeometry(num_layers, num_kv_heads, head_dim, block_size, dtype)``: ``itemsize``,
  ``block_nbytes`` (one block of K or V in one layer), ``num_blocks_for(tokens)``,
  ``request_nbytes(tokens)`` (whole blocks, all layers, K and V).
- ``split_layers(num_layers, num_groups)``: consecutive ``[start, stop)`` layer ranges.
- ``DTYPE_SIZES``: bytes per element of the dtypes a cache may hold.
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPE_SIZES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8, "int8": 1, "uint8": 1, "float8_e4m3fn": 1}


@dataclass(frozen=True)
class KVGeometry:
    """Shape of one rank's paged KV cache, as plain ints (the scheduler side has no torch)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_SIZES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_SIZES)}, got {self.dtype!r}")
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block of K (or V) in one layer."""
        return self.block_size * self.num_kv_heads * self.head_dim * self.itemsize

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def request_nbytes(self, num_tokens: int) -> int:
        """Bytes moved for a request of ``num_tokens`` tokens (whole blocks, all layers, K and V)."""
        return self.num_layers * 2 * self.num_blocks_for(num_tokens) * self.block_nbytes


def split_layers(num_layers: int, num_groups: int) -> list[tuple[int, int]]:
    """``num_groups`` consecutive ``[start, stop)`` layer ranges, sizes differing by at most 1."""
    num_groups = max(1, min(num_groups, num_layers))
    base, extra = divmod(num_layers, num_groups)
    out, start = [], 0
    for g in range(num_groups):
        stop = start + base + (1 if g < extra else 0)
        out.append((start, stop))
        start = stop
    return out
