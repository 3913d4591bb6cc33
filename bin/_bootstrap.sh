# Sourced by bin/mlxd, bin/test, bin/bench: find or install uv, then sync the locked
# environment into .venv. Only python3 needs to exist beforehand.
set -euo pipefail
MLXD_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export MLXD_ROOT

find_uv() {
    if command -v uv >/dev/null 2>&1; then command -v uv; return; fi
    for candidate in "$HOME/.local/bin/uv" "$HOME/.cargo/bin/uv" "$MLXD_ROOT/.tools/bin/uv"; do
        if [ -x "$candidate" ]; then echo "$candidate"; return; fi
    done
    # No uv: install it from PyPI into a private virtual environment inside the project.
    echo "mlxd: installing uv into $MLXD_ROOT/.tools (first run only)" >&2
    if python3 -m venv "$MLXD_ROOT/.tools" >/dev/null 2>&1; then
        "$MLXD_ROOT/.tools/bin/python" -m pip install --quiet --disable-pip-version-check uv >&2
    else
        # Debian/Ubuntu without python3-venv: a --target install needs no venv module.
        python3 -m pip install --quiet --disable-pip-version-check --target "$MLXD_ROOT/.tools/lib" uv >&2
        mkdir -p "$MLXD_ROOT/.tools/bin"
        ln -sf "$MLXD_ROOT/.tools/lib/bin/uv" "$MLXD_ROOT/.tools/bin/uv"
    fi
    echo "$MLXD_ROOT/.tools/bin/uv"
}

UV="$(find_uv)"
export UV
# --frozen: install exactly uv.lock; never re-resolve on a user's machine.
sync_env() {
    "$UV" sync --frozen --quiet --project "$MLXD_ROOT" "$@" >&2
}
