#!/usr/bin/env bash
# Create the reference's separate virtual environment (eformer 0.0.101's white_kron) for
# benchmarks/step.py, benchmarks/parity.py and benchmarks/ref_checks.py.
#   bash benchmarks/setup_reference.sh [ENV_DIR]      (default: .refenv in the repo root)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
env_dir="${1:-$root/.refenv}"
python3 -m venv "$env_dir"
"$env_dir/bin/python" -m pip install --quiet --upgrade pip
"$env_dir/bin/python" -m pip install --quiet "jax==0.10.2" "optax==0.2.8" numpy chex msgpack contextlib2
"$env_dir/bin/python" -m pip install --quiet --no-deps "eformer==0.0.101"
# eformer's package __init__ imports more than white_kron needs; install what it asks for.
for _ in 1 2 3 4 5 6 7 8; do
  missing=$("$env_dir/bin/python" -c "from eformer.optimizers._tx import white_kron" 2>&1 \
    | sed -n "s/.*No module named '\([^'.]*\).*/\1/p" | tail -n 1)
  [[ -z "$missing" ]] && break
  echo "installing $missing (needed by eformer's imports)"
  "$env_dir/bin/python" -m pip install --quiet "$missing"
done
"$env_dir/bin/python" -c "from eformer.optimizers._tx import white_kron; print('reference ok')"
echo "$env_dir/bin/python"
