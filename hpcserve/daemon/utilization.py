"""Economic utilization: useful rank-seconds delivered / allocated rank-seconds. The one place the
ratio is computed, for ``GetUsage`` (``hpcserve status --tenants``) and ``hpcserve bench mixed``.
No torch, no gRPC. Definition and its bounds: docs/utilization.md.

Useful rank-seconds come from the usage meter (``daemon/usage.py``: per step and request the
engine's credit, ``engine/useful_work.py``, times the replica's ranks; debited again when the
work is never delivered), per class (``interactive``, ``batch``) and tenant.

Interface
- ``economic_utilization(useful_interactive_s, useful_batch_s, allocated_s) -> dict`` with
  ``economic_utilization`` (both classes), ``economic_utilization_interactive`` and
  ``economic_utilization_batch``: each useful value / ``allocated_s``. A tenant's share is
  ``share(its useful seconds, allocated_s)``; the tenants' shares add up to the total.
- ``window_utilization(start, end) -> dict``: the same three keys, plus ``useful_seconds`` (per
  class) and ``allocated_rank_seconds``, between two admin ``UsageReport`` snapshots (objects or
  mappings with ``useful_seconds_interactive``, ``useful_seconds_batch``,
  ``allocation_gpu_seconds`` and ``metered_gpu_seconds``), for a window such as the bench's.

Bounds: each step's credits are at most its time x ranks, so over a daemon's lifetime the useful
rank-seconds never exceed ranks x uptime and the ratio is in [0, 1] exactly (up to float
rounding, which ``share`` clamps). Over a window, a step that began before the window and ended
inside it is metered whole; ``window_utilization`` therefore divides by the larger of ranks x
window and the rank-seconds of the steps metered in the window (``metered_gpu_seconds``, which
grows with the useful seconds in the same meter snapshot), so the window value stays <= 1; the
difference is at most one step per replica. A debit inside the window of work credited before it
lowers the window's value (floored at 0).
"""

from __future__ import annotations

from collections.abc import Mapping

CLASSES = ("interactive", "batch")
KEYS = ("economic_utilization", "economic_utilization_interactive", "economic_utilization_batch")


def share(useful_s: float, allocated_s: float) -> float:
    """``useful_s / allocated_s`` within [0, 1]; 0 when nothing was allocated."""
    if not allocated_s > 0:
        return 0.0
    return min(1.0, max(0.0, useful_s / allocated_s))


def economic_utilization(useful_interactive_s: float, useful_batch_s: float, allocated_s: float) -> dict[str, float]:
    """The three ratios over one span (see the module docstring)."""
    return {"economic_utilization": share(useful_interactive_s + useful_batch_s, allocated_s),
            "economic_utilization_interactive": share(useful_interactive_s, allocated_s),
            "economic_utilization_batch": share(useful_batch_s, allocated_s)}


def _get(report, key: str) -> float:
    v = report.get(key, 0.0) if isinstance(report, Mapping) else getattr(report, key, 0.0)
    return float(v or 0.0)


def window_utilization(start, end) -> dict:
    """Economic utilization between two admin usage snapshots of one daemon (see the module
    docstring). ValueError when ``end`` does not follow ``start`` (another daemon, or swapped)."""
    alloc = _get(end, "allocation_gpu_seconds") - _get(start, "allocation_gpu_seconds")
    metered = _get(end, "metered_gpu_seconds") - _get(start, "metered_gpu_seconds")
    if alloc <= 0 or metered < -1e-9:
        raise ValueError("the usage snapshots are not of one daemon in order (allocated rank-seconds did not grow)")
    useful = {c: _get(end, f"useful_seconds_{c}") - _get(start, f"useful_seconds_{c}") for c in CLASSES}
    allocated = max(alloc, metered)
    return {**economic_utilization(useful["interactive"], useful["batch"], allocated),
            "useful_seconds": useful, "allocated_rank_seconds": allocated}
