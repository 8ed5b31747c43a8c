#!/usr/bin/env bash
# timm's own model tests (tests/test_models.py of the installed timm release) over every model spach registers.
#
#   tools/timm-model-tests.sh                      # fetches timm's sdist (same version as installed) once, into the cache
#   tools/timm-model-tests.sh /path/timm-X.tar.gz  # or an sdist / an unpacked timm source tree you already have
#   tools/timm-model-tests.sh "" -n 4 -x           # arguments after the first go to pytest (not -k: see SELECT)
#   SELECT="fx_torchscript or window" tools/timm-model-tests.sh   # a part of it (a pytest -k expression)
#
# The test file selects models from timm's registry when it is collected; `-p spach` imports spach first (as a
# pytest plugin, it has no hooks), so the zoo is registered by then, and `-k` keeps only spach's names (read from
# spach itself). The two tests that download weights (test_model_load_pretrained, test_model_features_pretrained)
# are deselected: they need the network. Environment: PY (the python, default .venv/bin/python),
# TIMM_TESTS_CACHE (default ~/.cache/spach/timm-tests), SELECT (a -k expression ANDed with the selection).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
CACHE=${TIMM_TESTS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/spach/timm-tests}
SOURCE=${1:-}
[ $# -gt 0 ] && shift

[ -x "$PY" ] || { echo "timm-model-tests: no python at $PY (make install, or set PY)" >&2; exit 2; }
case $PY in /*) ;; */*) PY=$PWD/$PY ;; esac  # the tests run from timm's folder: an absolute path
VERSION=$("$PY" -c 'import timm; print(timm.__version__)')

if [ -z "$SOURCE" ]; then
    SOURCE=$CACHE/timm-$VERSION.tar.gz
    if [ ! -f "$SOURCE" ]; then
        mkdir -p "$CACHE"
        "$PY" -m pip download "timm==$VERSION" --no-binary :all: --no-deps -d "$CACHE" >&2
    fi
fi

if [ -f "$SOURCE" ]; then
    # only the tests and the pytest settings (markers): the timm under test is the installed one
    top=$(tar -tzf "$SOURCE" | awk -F/ 'NR == 1 {print $1}')
    DIR=$CACHE/unpacked/$top
    if [ ! -f "$DIR/tests/test_models.py" ]; then
        mkdir -p "$CACHE/unpacked"
        tar -xzf "$SOURCE" -C "$CACHE/unpacked" "$top/tests" "$top/pyproject.toml"
    fi
elif [ -d "$SOURCE" ]; then
    DIR=$SOURCE
else
    echo "timm-model-tests: $SOURCE is neither a timm sdist nor a timm source folder" >&2
    exit 2
fi
[ -f "$DIR/tests/test_models.py" ] || { echo "timm-model-tests: no tests/test_models.py in $DIR" >&2; exit 2; }

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
MODELS=$("$PY" -c 'import spach; print(" or ".join(spach.list_models(newcomers=True) + spach.models.list_release_models()))')
COUNT=$("$PY" -c 'import spach; print(len(spach.list_models(newcomers=True) + spach.models.list_release_models()))')
echo "timm $VERSION's tests/test_models.py over spach's $COUNT registered models (spach from $ROOT)" >&2

cd "$DIR"
exec "$PY" -m pytest -p spach -p no:cacheprovider tests/test_models.py -q -rfE \
    -W ignore::pytest.PytestUnknownMarkWarning \
    -k "($MODELS) and not test_model_load_pretrained and not test_model_features_pretrained${SELECT:+ and ($SELECT)}" \
    "$@"
