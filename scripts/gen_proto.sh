#!/usr/bin/env bash
# Regenerate the Python gRPC code from proto/ into hpcserve/api/v1/ (path mirrors import path).
# Deterministic: fixed grpcio-tools version, sorted inputs, run from the repo root.
#   scripts/gen_proto.sh                 uses .venv/bin/python if present, else python3
#   PYTHON=/path/to/python scripts/gen_proto.sh
# CI: run it, then `git diff --exit-code hpcserve/api/v1` (tests/test_proto.py checks the same).
set -euo pipefail
export LC_ALL=C
GRPC_TOOLS_VERSION=1.85.1

cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

have=$("$PYTHON" -c 'import grpc_tools.grpc_version as v; print(v.VERSION)' 2>/dev/null || true)
if [[ "$have" != "$GRPC_TOOLS_VERSION" ]]; then
  echo "gen_proto.sh: need grpcio-tools==$GRPC_TOOLS_VERSION in $PYTHON (found: ${have:-none})" >&2
  echo "  $PYTHON -m pip install grpcio-tools==$GRPC_TOOLS_VERSION" >&2
  exit 1
fi

mapfile -t protos < <(find proto/hpcserve/api/v1 -name '*.proto' | sort)
"$PYTHON" -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. "${protos[@]}"
echo "generated: $(ls hpcserve/api/v1/*_pb2*.py* | tr '\n' ' ')"
