#!/usr/bin/env bash
# Set up vlframe in ./.venv, ready to run: bash scripts/setup.sh
#
# The heavy dependencies (torch, timm, ...) go into a shared environment keyed by a hash of the
# dependency lists in pyproject.toml (default ~/.cache/vlframe/deps-HASH, or $VLFRAME_DEPS),
# installed once (editing entry points or metadata reuses it); each
# checkout gets a light ./.venv that sees those packages and holds an editable install of this
# checkout, so several clones never point one another's `vlframe` command at the wrong tree.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
venv="$root/.venv"
# The dependencies (and test extras), read from pyproject.toml: they alone key the environment.
requirements=$("$python" - "$root/pyproject.toml" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
print("\n".join(project["dependencies"] + sum(project.get("optional-dependencies", {}).values(), [])))
PY
)
hash=$(printf '%s\n%s\n' "$("$python" -c 'import sys; print(sys.version)')" "$requirements" | sha256sum | cut -c1-16)
deps=${VLFRAME_DEPS:-${XDG_CACHE_HOME:-$HOME/.cache}/vlframe/deps-$hash}

if [ ! -f "$deps/.complete" ]; then
    echo "vlframe setup: installing dependencies into $deps (once; several minutes for torch)" >&2
    rm -rf "$deps"
    "$python" -m venv "$deps"
    "$deps/bin/python" -m pip install --quiet --upgrade pip
    printf '%s\n' "$requirements" > "$deps/requirements.txt"
    "$deps/bin/python" -m pip install --quiet -r "$deps/requirements.txt"
    touch "$deps/.complete"
fi

deps_site=$("$deps/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.vlframe-deps" 2>/dev/null)" != "$deps_site" ]; then
    rm -rf "$venv"
    # No pip or setuptools of its own: the shared environment's (newer) ones are used.
    "$python" -m venv --without-pip "$venv"
    venv_site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
    echo "$deps_site" > "$venv_site/vlframe-deps.pth"   # a .pth line adds the shared packages
    echo "$deps_site" > "$venv/.vlframe-deps"
fi
# Editable install of this checkout: registers the `vlframe` command and the built-in plugins'
# entry points (cheap, so it runs every time and follows any change to pyproject.toml).
if ! log=$("$venv/bin/python" -m pip install --quiet --no-deps --no-build-isolation --no-index -e "$root" 2>&1); then
    echo "$log" >&2
    echo "vlframe setup: installing this checkout failed" >&2
    exit 1
fi
"$venv/bin/vlframe" --help > /dev/null
echo "vlframe setup: ready in $venv" >&2
