# Sourced by the scripts: make sure .venv exists and holds the project (editable) with dev tools.
# Re-installs only when pyproject.toml changed since the last install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "mqnode needs Python 3.11+ (found: $("$PY" --version 2>&1)); set PYTHON=python3.11" >&2
    exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.installed-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    echo "setting up $VENV (first run only) ..." >&2
    if ! "$VENV/bin/python" -m pip install -q -e "$ROOT[dev]" >"$VENV/install.log" 2>&1; then
        cat "$VENV/install.log" >&2
        echo "venv set-up failed; see above" >&2
        exit 1
    fi
    rm -f "$VENV"/.installed-*
    touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
