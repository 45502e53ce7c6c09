#!/usr/bin/env bash
# Installs the real API clients the server tests drive (`openai`, `boto3`, `opensearch-py`, and
# LangChain for examples/langchain_rag.py) into a private virtual environment, .work/venv, from PyPI. Idempotent: does nothing when the pinned versions are there.
# Needs python3 with the venv module and access to PyPI.
#
#   scripts/setup-test-clients.sh [VENV]     (default: .work/venv beside this script's repo)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$root/.work/venv}"
# Pinned so a new client release cannot change what the tests check without a commit saying so.
packages=(openai==3.51.0 boto3==1.44.5 opensearch-py==3.2.0 langchain-core==1.8.3
  langchain-openai==1.7.4 langchain-text-splitters==1.1.3 numpy==2.4.6)
stamp="$venv/.thinkrag-clients"
want="${packages[*]}"
if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
mkdir -p "$(dirname "$venv")"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${packages[@]}"
echo "$want" > "$stamp"
echo "test clients installed in $venv: $want" >&2
