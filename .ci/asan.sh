#!/usr/bin/env bash
# The C WAL's test suite once more, against a second build of walstate._walc made
# with AddressSanitizer + UndefinedBehaviorSanitizer (WALSTATE_SANITIZE=1, see
# csrc/build_ffi.py). The build goes to a temporary directory; the installed
# package and the source tree are left alone.
#
#   .ci/asan.sh [extra pytest args]
#
# Env: PYTHON (default python3), KEEP=1 keeps the build directory.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
TESTS=(tests/wal/test_wal.py tests/wal/test_wal_fuzz.py tests/wal/test_crc32c.py tests/engine/test_speedups.py
       tests/engine/test_replay.py tests/wal/test_wal_endhint.py tests/wal/test_wal_reader_race.py)

BUILD=$(mktemp -d "${TMPDIR:-/tmp}/walstate-asan.XXXXXX")
if [ "${KEEP:-0}" != 1 ]; then
    trap 'rm -rf "$BUILD"' EXIT
fi

# 1. the pure-Python package, without its compiled module
mkdir -p "$BUILD/pkg"
cp -r "$REPO/walstate" "$BUILD/pkg/walstate"
find "$BUILD/pkg/walstate" \( -name '*.so' -o -name __pycache__ \) -prune -exec rm -rf {} +

# 2. the sanitized extension, compiled with cffi in $BUILD/obj (cffi compiles from
#    inside its tmpdir, where build_ffi.py's relative csrc/ paths must resolve)
mkdir -p "$BUILD/obj"
cp -r "$REPO/csrc" "$BUILD/obj/csrc"
echo "== building walstate._walc with -fsanitize=address,undefined in $BUILD"
(cd "$REPO" && WALSTATE_SANITIZE=1 "$PY" - "$BUILD/obj" <<'EOF'
import importlib.util
import sys

spec = importlib.util.spec_from_file_location("build_ffi", "csrc/build_ffi.py")
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
print(mod.ffibuilder.compile(tmpdir=sys.argv[1], verbose=False))
EOF
) > "$BUILD/build.log" 2>&1 || { cat "$BUILD/build.log"; exit 1; }
SO=$(find "$BUILD/obj" -name '_walc*.so' | head -n 1)
[ -n "$SO" ] || { cat "$BUILD/build.log"; echo "asan.sh: no _walc*.so built" >&2; exit 1; }
if grep -E 'warning:' "$BUILD/build.log"; then
    echo "asan.sh: the sanitized build has compiler warnings" >&2
    exit 1
fi
nm -D "$SO" > "$BUILD/symbols"
grep -q ' U __asan_init' "$BUILD/symbols" || { echo "asan.sh: $SO lacks ASan" >&2; exit 1; }
grep -q ' U __ubsan_' "$BUILD/symbols" || { echo "asan.sh: $SO lacks UBSan" >&2; exit 1; }
cp "$SO" "$BUILD/pkg/walstate/"

# 2b. walstate._speedups (the engine's hot path, which calls into the log by
#     address), sanitized as well
EXT=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
INC=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
gcc -shared -fPIC -O1 -g -std=c11 -Wall -Wextra -Werror -fsanitize=address,undefined \
    -fno-omit-frame-pointer -fvisibility=hidden -I"$INC" -I"$REPO/csrc" -I"$REPO/csrc/speedups" \
    "$REPO"/csrc/speedups/*.c -o "$BUILD/pkg/walstate/_speedups$EXT"

# 3. run the tests against it: PYTHONPATH puts the sanitized package first (the
#    editable install's finder comes after sys.path); the cwd is not the repo, so
#    the source tree's walstate/ (with its unsanitized .so) is not importable;
#    subprocesses the tests start inherit all of this.
export PYTHONPATH="$BUILD/pkg${PYTHONPATH:+:$PYTHONPATH}"
LD_PRELOAD="$(gcc -print-file-name=libasan.so)"
export LD_PRELOAD
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:${UBSAN_OPTIONS:-}"
cd "$BUILD"
"$PY" -c '
import sys, walstate._walc as m, walstate._speedups as s
for mod in (m, s):
    if not mod.__file__.startswith(sys.argv[1]):
        sys.exit(f"asan.sh: imported {mod.__file__}, not the sanitized build")
    print("== testing", mod.__file__)
' "$BUILD/pkg"
ARGS=()
for t in "${TESTS[@]}"; do ARGS+=("$REPO/$t"); done
# (not exec: the EXIT trap removes the build directory afterwards)
# (the power-loss tracer is an LD_PRELOAD library too, which cannot come before
# ASan's runtime: that test runs in the ordinary suite)
"$PY" -m pytest --rootdir="$REPO" -c "$REPO/pyproject.toml" -p no:cacheprovider -q \
    -k "not test_power_loss_around_the_hint" "${ARGS[@]}" "$@"
