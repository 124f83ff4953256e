#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs `citrus demo`: a fact hidden in the middle of a
# document far longer than the default model's window, asked with citrus_shared and streaming_llm.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/citrus demo "$@"
