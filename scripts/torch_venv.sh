# Sourced by the PyTorch comparison scripts (from the repository root): sets `py` to the Python of
# the pinned environment (tests/golden/requirements.txt: torch 2.15, transformers 5.23; the
# registry's torch wheel is the CUDA build, about 5.6 GB), creating it once under
# ~/.cache/deepseek-burn/venv-torch, or VENV=DIR.
venv="${VENV:-$HOME/.cache/deepseek-burn/venv-torch}"
if ! "$venv/bin/python" -c "import torch, transformers" 2>/dev/null; then
  echo "creating $venv (torch 2.15, transformers 5.23; a few minutes, once)" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -r tests/golden/requirements.txt
fi
py="$venv/bin/python"
