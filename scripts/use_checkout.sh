# Sourced by gpu_benchmark.sh and tpu_benchmark.sh: makes `import cde_jax` (and
# `cde_jax.convert`) resolve to this checkout, sets PY, and cleans up on exit.
# Expects: the current directory is the repository root; $mode is gpu, tpu or cpu-smoke.

PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

checkout() {  # from / : `python -c` would otherwise import from the current directory
  (cd / && "$PY" -c 'import cde_jax.convert, pathlib
print(pathlib.Path(cde_jax.__file__).resolve().parents[1])' 2>/dev/null) || true
}
site=""
trap 'rm -rf ${site:+"$site"}' EXIT
if [[ "$(checkout)" != "$PWD" ]]; then
  # A fresh accelerator machine: install in place. Elsewhere never repoint a shared install:
  # a package tree of links put first on PYTHONPATH does the same for this script only.
  if [[ $mode != cpu-smoke ]] \
      && "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . \
      && [[ "$(checkout)" == "$PWD" ]]; then
    :
  else
    site=$(mktemp -d)
    mkdir "$site/cde_jax"
    ln -s "$PWD"/cde_jax/* "$site/cde_jax/"
    ln -sfn "$PWD/convert" "$site/cde_jax/convert"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
[[ "$(checkout)" == "$PWD" ]] || { echo "cannot import cde_jax from $PWD" >&2; exit 1; }
