"""Multi-rank execution of a replica: the MPI world the daemon launches.

The daemon starts workers as one MPI world (``$VENV/bin/mpiexec -n N hpcserve worker ...``).
Every rank runs the same program; within a replica the leader decides and broadcasts a diff
of each step, the other ranks only execute.

- :mod:`hpcserve.cluster.comm`: mpi4py helpers (thread level and the lock that serializes
  MPI calls below ``THREAD_MULTIPLE``, ``Test()`` polling with backoff, ``MPI_Abort`` on an
  uncaught exception with rank/host-tagged tracebacks, raw-buffer ``Isend``/``Irecv``).

Importing this package never imports mpi4py; that happens in :func:`comm.init_mpi`.
"""
