#!/usr/bin/env bash
# Command (a): install, bring up local Kafka + Redis, run the demo end to end, bring them down.
# Set KAFKA_BOOTSTRAP_SERVERS and REDIS_URL to use services you already run instead.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source deploy/install.sh
if [ -z "${KAFKA_BOOTSTRAP_SERVERS:-}" ] || [ -z "${REDIS_URL:-}" ]; then
  trap 'python3 deploy/stack.py down' EXIT
  eval "$(python3 deploy/stack.py up)"
  export KAFKA_BOOTSTRAP_SERVERS REDIS_URL
fi
"$VENV/bin/mirstream" demo "$@"
