#!/usr/bin/env bash
# The whole test suite, from a fresh checkout: install + build, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python -m pytest -q -ra tests "$@"
