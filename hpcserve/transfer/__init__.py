"""KV-cache handoff between prefill and decode ranks (issue #5).

- :mod:`hpcserve.transfer.geometry`: :class:`KVGeometry` and layer groups (no torch).
- :mod:`hpcserve.transfer.base`: the connector contract (scheduler side, worker side,
  :class:`TransferState`, :class:`TransferMeta`, :class:`KVGeometry`). No torch.
- :mod:`hpcserve.transfer.packing`: blocks of the paged KV cache ⇄ one contiguous
  buffer per layer group (torch), digests, staging-buffer pool.
- :mod:`hpcserve.transfer.device`: buffer paths (host, CUDA-aware MPI, CUDA with host
  staging) chosen per cache device and MPI capability (``mpi_cuda_aware``, ``select_path``).
- :mod:`hpcserve.transfer.mpi`: :class:`MpiConnector` (raw ``Isend``/``Irecv``).
- :mod:`hpcserve.transfer.loopback`: :class:`LoopbackConnector` (in-process, for tests).
- :mod:`hpcserve.transfer.bench`: handoff vs raw MPI bandwidth
  (``mpiexec -n 2 python -m hpcserve.transfer.bench ...``).

Importing this package imports neither torch nor mpi4py.
"""

from hpcserve.transfer.base import (
    KVConnectorScheduler,
    KVConnectorWorker,
    KVGeometry,
    Transfer,
    TransferError,
    TransferMeta,
    TransferState,
)

__all__ = [
    "KVConnectorScheduler",
    "KVConnectorWorker",
    "KVGeometry",
    "Transfer",
    "TransferError",
    "TransferMeta",
    "TransferState",
]
