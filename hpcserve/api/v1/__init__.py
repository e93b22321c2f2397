"""Generated protobuf/gRPC code for ``hpcserve.api.v1``. Do not edit by hand.

Sources: ``proto/hpcserve/api/v1/{serving,worker}.proto``; regenerate with
``scripts/gen_proto.sh`` (grpcio-tools 1.85.1). ``tests/test_proto.py`` fails when these
files are stale.

    from hpcserve.api.v1 import serving_pb2, serving_pb2_grpc   # public Serving service
    from hpcserve.api.v1 import worker_pb2, worker_pb2_grpc     # internal WorkerLink
"""
