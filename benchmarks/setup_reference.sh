#!/usr/bin/env bash
# Create the reference's separate virtual environment (eformer 0.0.101's white_kron) for the
# benchmarks that compare with it (`python -m benchmarks step`, `parity`, ...) and for
# tests/test_parity.py.
#   bash benchmarks/setup_reference.sh [ENV_DIR]      (default: .refenv in the repo root)
# eformer is installed with --no-deps: its declared dependencies (tensorstore, tqdm, tblib, ...)
# are not needed by `eformer.optimizers._tx.white_kron`; the packages below are all its import needs.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
env_dir="${1:-$root/.refenv}"
python3 -m venv "$env_dir"
py="$env_dir/bin/python"
"$py" -m pip install --quiet --upgrade pip
"$py" -m pip install --quiet --no-deps "eformer==0.0.101"
"$py" -m pip install --quiet "jax==0.10.2" "optax==0.2.8" "chex==0.1.92" numpy msgpack contextlib2
"$py" -c "from eformer.optimizers._tx import white_kron; print('reference ok')"
echo "$py"
