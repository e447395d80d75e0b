#!/usr/bin/env bash
# Render a run's HTML transcript in headless Chromium and save a screenshot (needs Debian's chromium).
# Usage: bash scripts/screenshot_transcript.sh [out_dir]   (default: out/)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-out}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
.venv/bin/hogwild run "${QUESTION:-Name three prime numbers and check each one.}" --workers 3 --max-tokens 60 --protocol none \
    --view plain --transcript "$out/transcript.html" > "$out/run.log"
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --user-data-dir="$(mktemp -d)" --window-size=1280,1400 \
    --screenshot="$out/transcript.png" "file://$out/transcript.html" 2>/dev/null
echo "wrote $out/transcript.html and $out/transcript.png"
