# Sourced by the benchmark shell scripts (gpu_check.sh, mitigations.sh) from the repository root: sets `py` to the
# Python to use ($PYTHON, else .venv/bin/python, else python3) and, on a machine without LesionLab installed (the
# lent GPU machine), installs the wheels in .whl/ (e.g. grad-cam, ttach) into a temporary folder when grad-cam is
# missing and puts the checkout on PYTHONPATH.
py="${PYTHON:-}"
if [ -z "$py" ]; then if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi; fi
if ! "$py" -c "import pytorch_grad_cam" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  site="$(mktemp -d /tmp/lesionlab-site.XXXX)"
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl || exit 1
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
