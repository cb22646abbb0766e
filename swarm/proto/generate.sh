#!/usr/bin/env bash
# Regenerate the Python gRPC code from coordinator.proto (run from anywhere).
# The proto is compiled with the repository root as include path, so the generated
# coordinator_pb2_grpc.py imports `from swarm.proto import coordinator_pb2` (a package import,
# not the top-level `import coordinator_pb2` that protoc emits for a flat include path).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
python -m grpc_tools.protoc -I . \
  --python_out=. --pyi_out=. --grpc_python_out=. \
  swarm/proto/coordinator.proto
grep -q "^from swarm.proto import coordinator_pb2" swarm/proto/coordinator_pb2_grpc.py || {
  echo "generate.sh: coordinator_pb2_grpc.py does not import swarm.proto.coordinator_pb2" >&2
  exit 1
}
# ruff excludes the generated *.py but not the .pyi stub: normalise it so `make lint` stays clean.
if command -v ruff >/dev/null 2>&1; then
  ruff check --fix --quiet swarm/proto/coordinator_pb2.pyi
  ruff format --quiet swarm/proto/coordinator_pb2.pyi
fi
echo "generated swarm/proto/coordinator_pb2.py, coordinator_pb2.pyi, coordinator_pb2_grpc.py"
