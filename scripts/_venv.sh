# shellcheck shell=bash
# Sourced by scripts/test and scripts/dev (which cd to the repo root first).
#
#   ensure_venv [test]
#
# Makes sure .venv exists (python3 >= 3.11, `python3 -m venv`) and holds an
# editable install of this project (with the [test] extra if asked).  pip runs
# only when pyproject.toml changed since the last install; the stamp is kept in
# .venv/.install-stamp-<base|test>.  Set PYTHON to use another interpreter for
# creating the venv.

_venv_die() {
    echo "error: $*" >&2
    exit 2
}

_venv_python_ok() {
    "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null
}

_venv_create() {
    local py="${PYTHON:-python3}"
    command -v "$py" >/dev/null 2>&1 \
        || _venv_die "$py not found; install Python 3.11 or newer (Debian: apt-get install python3 python3-venv)"
    _venv_python_ok "$py" \
        || _venv_die "Python 3.11 or newer is required, but $py is $("$py" -V 2>&1)"

    if "$py" -m venv .venv; then
        return 0
    fi
    rm -rf .venv
    # Debian/Ubuntu ship venv's ensurepip separately (python3-venv).
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "python3 -m venv failed; installing python3-venv" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y --no-install-recommends python3-venv \
            || { apt-get update && apt-get install -y --no-install-recommends python3-venv; } \
            || _venv_die "could not install python3-venv"
        "$py" -m venv .venv || { rm -rf .venv; _venv_die "$py -m venv still fails"; }
    else
        _venv_die "'$py -m venv' failed (ensurepip missing?). Run: sudo apt-get install python3-venv"
    fi
}

ensure_venv() {
    local extra="${1:-}"
    local lock="${TMPDIR:-/tmp}/saslauthd-oidc-venv-$(pwd | cksum | cut -d' ' -f1).lock"
    if command -v flock >/dev/null 2>&1; then
        # Serialise concurrent scripts/test / scripts/dev runs on this checkout.
        exec {_venv_lock_fd}>"$lock"
        flock "$_venv_lock_fd"
    fi

    if [ -x .venv/bin/python ] && ! _venv_python_ok .venv/bin/python; then
        _venv_die ".venv uses $(.venv/bin/python -V 2>&1); Python 3.11+ is required. Remove .venv and retry."
    fi
    [ -x .venv/bin/python ] || _venv_create

    local hash
    hash="$(cksum < pyproject.toml | cut -d' ' -f1)"
    local want="${extra:-base}"
    if [ "$(cat ".venv/.install-stamp-$want" 2>/dev/null)" != "$hash" ] \
        && { [ "$want" != base ] || [ "$(cat .venv/.install-stamp-test 2>/dev/null)" != "$hash" ]; }; then
        echo "Installing saslauthd-oidc${extra:+[$extra]} into .venv ..." >&2
        local spec="."
        [ -n "$extra" ] && spec=".[$extra]"
        .venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$spec"
        echo "$hash" > ".venv/.install-stamp-$want"
    fi

    if [ -n "${_venv_lock_fd:-}" ]; then
        exec {_venv_lock_fd}>&-
    fi
}
