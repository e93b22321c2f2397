"""A receiving rank dies (SIGKILL) in the middle of a KV transfer; run by
tests/test_transfer_mpi.py as ``$VENV/bin/mpiexec [-disable-auto-cleanup] -n 2 python
tests/mpi_transfer_peer_death.py RESULT_FILE TIMEOUT_S``.

Rank 1 posts its receives, waits until the first group has landed, writes the time to
RESULT_FILE.killed, then SIGKILLs itself.
Rank 0 (the sender) polls its transfer and writes the outcome as JSON to RESULT_FILE (a
file, not stdout: the launcher may stop forwarding a dying world's output).

What MPICH 5.0.2 (hydra, ``-launcher fork``) does, measured here:
- default: hydra sees the SIGKILL and kills the rest of the world at once; mpiexec exits
  9 ("BAD TERMINATION ... EXIT CODE: 9") about 0.1 s after the death; rank 0 never
  writes (its transfer was still pending).
- ``-disable-auto-cleanup``: survivors are sent SIGUSR1 about 0.04 s after the death
  (Python's default action for it kills the process, so rank 0 installs a handler). In
  about 7 runs of 10 rank 0 then lives on: its Isend never completes and the transfer
  turns FAILED after TIMEOUT_S; mpiexec exits 9 about 0.7 s after rank 0 finishes. In the
  other runs rank 0 is killed anyway about 0.03 s after the death: no Python traceback, no
  faulthandler output, no PMI abort in ``mpiexec -verbose``, SIGUSR1 still caught, so it
  is an uncatchable kill from outside. Either way nothing hangs.
- ``MPI_Cancel`` of the in-flight send to the dead rank segfaulted, so the connector never
  cancels sends (the buffer stays with MPI instead).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import torch

from hpcserve.cluster.comm import init_mpi
from hpcserve.transfer.base import KVConnectorScheduler, KVGeometry, TransferState
from hpcserve.transfer.mpi import MpiConnector

result_file, timeout_s = sys.argv[1], float(sys.argv[2])
torch.set_num_threads(1)
world = init_mpi()
rank = world.rank
events: list[str] = []
t0 = time.monotonic()


def write(**kw) -> None:
    with open(result_file + ".tmp", "w") as f:
        json.dump(kw, f)
    os.replace(result_file + ".tmp", result_file)


if rank == 0:
    signal.signal(signal.SIGUSR1, lambda s, f: events.append(f"SIGUSR1 at {time.monotonic() - t0:.2f}s"))

LAYERS, NB, NTOK = 30, 129, 2048  # 128 blocks x 30 layers: 90 MiB in 30 one-layer groups
geo = KVGeometry(LAYERS, 3, 64, 16, "float32")
shape = (LAYERS, 2, NB, 16, 3, 64)
kv = torch.ones(shape) if rank == 0 else torch.zeros(shape)
meta = KVConnectorScheduler(geo, 1, "consumer", layers_per_group=1).build_meta(
    "doomed", NTOK, list(range(1, NB)), list(range(1, NB)), peer=0
)
conn = MpiConnector(world, timeout_s=timeout_s, num_staging=1)
world.comm.Barrier()
t0 = time.monotonic()
if rank == 1:
    conn.start_recv(meta, kv)
    while conn.poll()[meta.req_id] is not TransferState.TRANSFERRING:
        pass
    with open(result_file + ".killed", "w") as f:  # wall-clock time of death, for the test
        f.write(repr(time.time()))
    os.kill(os.getpid(), signal.SIGKILL)

conn.start_send(meta, kv)
state = conn.wait([meta.req_id], timeout_s=timeout_s + 30)[meta.req_id]
x = conn.info(meta.req_id)
write(
    state=state.name,
    error=x.error,
    elapsed_s=round(time.monotonic() - t0, 3),
    nbytes_done=x.nbytes_done,
    total_nbytes=meta.total_nbytes,
    events=events,
    zombies=conn.num_zombies,
)
conn.close()
