# Sourced by the scripts (and by hand: `source scripts/venv.sh`): make sure .venv exists and
# holds the project (editable) with dev tools, then put it first on PATH. Re-installs only
# when pyproject.toml changed since the last install. Sets no shell options, so sourcing it
# in an interactive shell leaves that shell as it was (the scripts set their own).
_mqnode_venv() {
    ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    VENV="$ROOT/.venv"
    local py="${PYTHON:-python3}" stamp
    if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "mqnode needs Python 3.11+ (found: $("$py" --version 2>&1)); set PYTHON=python3.11" >&2
        return 2
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        "$py" -m venv "$VENV" || return 1
    fi
    stamp="$VENV/.installed-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
    if [ ! -f "$stamp" ]; then
        "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
        echo "setting up $VENV (first run only) ..." >&2
        if ! "$VENV/bin/python" -m pip install -q -e "$ROOT[dev]" >"$VENV/install.log" 2>&1; then
            cat "$VENV/install.log" >&2
            echo "venv set-up failed; see above" >&2
            return 1
        fi
        rm -f "$VENV"/.installed-*
        touch "$stamp"
    fi
    export PATH="$VENV/bin:$PATH"
}
_mqnode_venv || {
    _mqnode_rc=$?
    # Sourced from an interactive shell: fail without closing it; from a script: stop it.
    case $- in *i*) return "$_mqnode_rc" ;; *) exit "$_mqnode_rc" ;; esac
}
