# Shared by scripts/serve and scripts/test: make .venv with requirements.txt installed, once.
VENV="${VENV:-.venv}"
ensure_venv() {
  local stamp="$VENV/.installed-$(cat requirements.txt requirements-test.txt pyproject.toml | sha256sum | cut -c1-16)"
  if [ -f "$stamp" ]; then return 0; fi
  echo "setting up $VENV (first run: a few minutes; torch is large)..." >&2
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -r requirements.txt -r requirements-test.txt
  "$VENV/bin/python" -m pip install -q --no-deps -e .
  rm -f "$VENV"/.installed-*
  touch "$stamp"
}
