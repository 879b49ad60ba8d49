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
# Safety net: whatever pytest did, stop the test stack (a no-op when it is not running).
trap 'python3 deploy/stack.py down --wipe --kafka-port "$KPORT" --redis-port "$RPORT" >/dev/null 2>&1 || true' EXIT
"$VENV/bin/ruff" check .
"$VENV/bin/python" -m pytest "$@"
