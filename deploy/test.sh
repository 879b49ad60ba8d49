#!/usr/bin/env bash
# Command (b): install into the project's venv, lint, run every test against a real Kafka broker
# and a real Redis server, then leave no service behind.
# Services: KAFKA_BOOTSTRAP_SERVERS / REDIS_URL if set, else testcontainers if Docker answers,
# else the local stack on test ports (tests/conftest.py starts and stops it).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source deploy/install.sh
KPORT="${MIRSTREAM_TEST_KAFKA_PORT:-19092}"; RPORT="${MIRSTREAM_TEST_REDIS_PORT:-16379}"
CKPORT="${MIRSTREAM_TEST_CLUSTER_KAFKA_PORT:-29092}"; CRPORT="${MIRSTREAM_TEST_CLUSTER_REDIS_PORT:-26379}"
# Safety net: whatever pytest did, stop the test stacks (a no-op when they are not running).
cleanup() {
  python3 deploy/stack.py down --wipe --kafka-port "$KPORT" --redis-port "$RPORT" >/dev/null 2>&1 || true
  python3 deploy/stack.py down --wipe --kafka-port "$CKPORT" --brokers 3 --redis-port "$CRPORT" --redis-cluster 3 \
    >/dev/null 2>&1 || true
}
trap cleanup EXIT
"$VENV/bin/ruff" check .
"$VENV/bin/python" -m pytest "$@"
