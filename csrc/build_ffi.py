"""cffi declarations of the C WAL (API, out-of-line mode); no logic here.

setup.py names this file in ``cffi_modules``; the result is ``walstate._walc``.
WALSTATE_SANITIZE=1 builds it with AddressSanitizer + UBSan (CI's second build).
"""

import os
import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
SOURCES = ["crc32c.c", "wal_hooks.c", "wal_segment.c", "wal_reader.c", "wal_writer.c",
           "wal_repair.c", "wal_endhint.c"]

CDEF = """
#define WAL_ECORRUPT ...
#define WAL_EMISMATCH ...
#define WAL_EVERSION ...
#define WAL_EGAP ...
#define WAL_ETORN ...
#define WAL_EPOISONED ...
#define WAL_ETOOBIG ...
#define WAL_EINVAL ...
#define WAL_EAGAIN ...
#define WAL_ESHORT ...
#define WAL_END_NONE ...
#define WAL_END_CLEAN ...
#define WAL_END_TORN ...
#define WAL_END_ERROR ...
#define WAL_HINT_NONE ...
#define WAL_HINT_USED ...
#define WAL_HINT_IGNORED ...
#define WAL_READ_END_HINT ...
#define WAL_OP_WRITE ...
#define WAL_OP_FDATASYNC ...
#define WAL_OP_FALLOCATE ...
#define WAL_OP_RENAME ...
#define WAL_OP_UNLINK ...
#define WAL_OP_OPEN ...
#define WAL_OP_READ ...
#define WAL_FSYNC_BUCKETS ...
#define WAL_FORMAT_VERSION ...
#define WAL_SEG_HDR_SIZE ...
#define WAL_REC_HDR_SIZE ...
#define WAL_REC_MAX_PAYLOAD ...
#define WAL_TYPE_PUT ...
#define WAL_TYPE_DELETE ...
#define WAL_TYPE_BATCH ...
#define WAL_TYPE_IGNORABLE ...

typedef struct wal wal_t;
typedef struct wal_reader wal_reader_t;
typedef struct {
    uint64_t system_id; uint64_t segment_size; uint64_t buffer_size; uint64_t min_next_lsn;
    uint64_t covered_lsn;
} wal_options_t;
typedef struct {
    uint64_t next_lsn; uint64_t written_lsn; uint64_t durable_lsn; uint64_t appends;
    uint64_t bytes_appended; uint64_t fsyncs; uint64_t writes; uint64_t segments_created;
    uint64_t seg_first_lsn; uint64_t seg_end; uint64_t seg_synced;
    uint64_t fsync_ns_total; uint64_t fsync_ns_max; uint64_t fsync_hist[32];
    uint64_t open_bytes_read; int poisoned; int end_hint;
} wal_stats_t;
typedef struct {
    uint64_t lsn; uint64_t synced_lsn; uint64_t seg_first_lsn; uint64_t offset;
    const uint8_t *payload; uint32_t len; uint8_t type;
} wal_record_t;
typedef struct {
    int status; int rc; uint64_t last_lsn; uint64_t expected_lsn; uint64_t seg_first_lsn;
    uint64_t offset; uint64_t cut_bytes; uint64_t later_segments; uint64_t found_system_id;
    uint64_t segments; uint64_t bytes; uint64_t bytes_read; int end_hint; char path[4096];
} wal_end_t;

int wal_open(const char *dir, const wal_options_t *opt, wal_t **out);
int wal_close(wal_t *w);
int wal_append(wal_t *w, unsigned type, const void *a, size_t alen, const void *b,
               size_t blen, uint64_t *lsn_out);
int wal_put(wal_t *w, const void *key, size_t klen, const void *val, size_t vlen,
            uint64_t *lsn_out);
int wal_put_nowait(wal_t *w, const void *key, size_t klen, const void *val, size_t vlen,
                   uint64_t *lsn_out);
int wal_sync(wal_t *w, uint64_t lsn, uint64_t *durable_out);
int wal_flush(wal_t *w);
int wal_remove_below(wal_t *w, uint64_t lsn, uint64_t *bytes_removed, uint64_t *segs_removed);
void wal_get_stats(wal_t *w, wal_stats_t *st);
int wal_reader_open(const char *dir, uint64_t system_id, uint64_t from_lsn, wal_reader_t **out);
int wal_reader_open_flags(const char *dir, uint64_t system_id, uint64_t from_lsn, unsigned flags,
                          wal_reader_t **out);
int wal_reader_next(wal_reader_t *r, wal_record_t *rec);
int wal_reader_batch(wal_reader_t *r, size_t max, uint64_t *lsn, uint8_t *type, uint64_t *off,
                     uint64_t *len, const uint8_t **base);
void wal_reader_end(wal_reader_t *r, wal_end_t *end);
void wal_reader_close(wal_reader_t *r);
int wal_cut(const char *dir, uint64_t seg_first_lsn, uint64_t offset, uint64_t *cut_bytes);
uint32_t wal_crc32c(uint32_t crc, const void *buf, size_t len);
int wal_crc32c_hw(void);
void wal_test_fault(int op, uint64_t nth, int err, int persistent);
uint64_t wal_test_calls(int op);
void wal_test_killpoint(const char *name, uint64_t nth);
int wal_test_sync_trace(const char *path);
const char *wal_strerror(int rc);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)

_cflags = ["-std=c11", "-O2", "-Wall", "-Wextra", "-fvisibility=hidden"]
_ldflags: list[str] = []
if os.environ.get("WALSTATE_SANITIZE") == "1":
    _cflags = ["-std=c11", "-O1", "-g", "-Wall", "-Wextra", "-fno-omit-frame-pointer",
               "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
    _ldflags = ["-fsanitize=address,undefined"]

ffibuilder.set_source(
    "walstate._walc",
    '#include "wal.h"\n#include "wal_format.h"',
    sources=[str(pathlib.Path("csrc") / s) for s in SOURCES],
    include_dirs=["csrc"],
    extra_compile_args=_cflags,
    extra_link_args=_ldflags + ["-lpthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
