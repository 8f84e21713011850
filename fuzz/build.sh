#!/usr/bin/env bash
# Builds the libFuzzer target over the C WAL reader with ASan + UBSan.
#   fuzz/build.sh OUT      -> OUT (the fuzzer binary)
# Run: OUT -max_total_time=600 -max_len=200000 WORKDIR/corpus fuzz/corpus
# (the first corpus directory collects new inputs; fuzz/corpus holds the seeds).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:?usage: fuzz/build.sh OUTPUT}
CC=${CC:-clang}
SRC=(crc32c.c wal_hooks.c wal_errors.c wal_record.c wal_segment.c wal_reader.c
     wal_open.c wal_writer.c wal_sync.c wal_prepare.c wal_repair.c wal_endhint.c)
ARGS=()
for s in "${SRC[@]}"; do ARGS+=("$REPO/csrc/$s"); done
"$CC" -g -O1 -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined \
    -fno-sanitize-recover=undefined -I"$REPO/csrc" -o "$OUT" \
    "$REPO/fuzz/wal_reader_fuzz.c" "${ARGS[@]}" -lpthread
