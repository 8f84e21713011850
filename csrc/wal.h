/*
 * walstate's write-ahead log: the public C API.
 *
 * Conventions: every function returns 0 (or a documented positive value),
 * a negative errno captured right after the failing system call, or a
 * negative WAL_E* code (<= -1000). Nothing aborts, nothing prints, no
 * string crosses the boundary except into caller-owned fixed buffers.
 * A wal_t is thread-safe; a wal_reader_t belongs to one thread at a time.
 */
#ifndef WALSTATE_WAL_H
#define WALSTATE_WAL_H

#include <stddef.h>
#include <stdint.h>

#define WAL_ECORRUPT -1001  /* invalid bytes followed by valid data, bad header */
#define WAL_EMISMATCH -1002 /* segment of another system_id, or misnamed */
#define WAL_EVERSION -1003  /* unknown format version */
#define WAL_EGAP -1004      /* first segment starts above the requested LSN */
#define WAL_ETORN -1005     /* wal_open found a torn tail: cut it first */
#define WAL_EPOISONED -1006 /* an earlier write/fsync failed: nothing more is acknowledged */
#define WAL_ETOOBIG -1007   /* payload above WAL_REC_MAX_PAYLOAD */
#define WAL_EINVAL -1008    /* bad argument */
#define WAL_EAGAIN -1009    /* wal_put_nowait: the append would wait or do I/O */
#define WAL_ESHORT -1010    /* the newest segment is shorter than its header records */

typedef struct wal wal_t;
typedef struct wal_reader wal_reader_t;

typedef struct {
    uint64_t system_id;    /* written into every segment header */
    uint64_t segment_size; /* nominal segment size (preallocated) */
    uint64_t buffer_size;  /* user-space append buffer */
    uint64_t min_next_lsn; /* the first LSN issued is at least this */
    uint64_t covered_lsn;  /* LSNs up to this are covered elsewhere (the snapshot):
                              with no segment yet, the first segment's prev_lsn; in
                              the last segment, damage in records up to it is passed
                              over when looking for the end */
} wal_options_t;

#define WAL_FSYNC_BUCKETS 32 /* log2 microsecond buckets */

typedef struct {
    uint64_t next_lsn;      /* LSN the next append gets */
    uint64_t written_lsn;   /* handed to write(2) */
    uint64_t durable_lsn;   /* fdatasynced */
    uint64_t appends;
    uint64_t bytes_appended; /* record bytes, headers included */
    uint64_t fsyncs;
    uint64_t writes;
    uint64_t segments_created;
    uint64_t seg_first_lsn;  /* current segment */
    uint64_t seg_end;        /* bytes used in the current segment */
    uint64_t seg_synced;     /* bytes of the current segment known durable */
    uint64_t fsync_ns_total;
    uint64_t fsync_ns_max;
    uint64_t fsync_hist[WAL_FSYNC_BUCKETS];
    uint64_t open_bytes_read; /* segment bytes wal_open read to find the end */
    int poisoned;            /* 0, or the error that poisoned the log */
    int end_hint;            /* WAL_HINT_*: how wal_open used wal/END */
} wal_stats_t;

/* wal/END, the end hint a clean wal_close leaves (docs/FORMAT.md): */
#define WAL_HINT_NONE 0    /* no END (or not asked to use it) */
#define WAL_HINT_USED 1    /* END matched the log: the end was found without a scan */
#define WAL_HINT_IGNORED 2 /* END was garbage or did not match: full scan */

/* Opens (creating if needed) the log in directory `dir` (which must exist).
 * Removes *.tmp leftovers and, durably, wal/END (using it first, if it
 * matches the newest segment, to find the end without reading the segment);
 * the last segment must end cleanly (else WAL_ETORN).
 * On success *out owns the handle; free it with wal_close. */
int wal_open(const char *dir, const wal_options_t *opt, wal_t **out);

/* Writes and fdatasyncs what is buffered (unless poisoned); if that worked,
 * publishes wal/END (where the log ends); then frees `w` in every case.
 * Returns the flush result (a failure to write END is not an error: the next
 * open scans instead). */
int wal_close(wal_t *w);

/* Appends one record whose payload is a||b; *lsn_out gets its LSN.
 * Buffered: durable only after wal_sync covers it. -ENOSPC: a new segment
 * could not be allocated; the log stays usable. */
int wal_append(wal_t *w, unsigned type, const void *a, size_t alen, const void *b,
               size_t blen, uint64_t *lsn_out);

/* PUT payload = u16 key length || key || value. */
int wal_put(wal_t *w, const void *key, size_t klen, const void *val, size_t vlen,
            uint64_t *lsn_out);

/* wal_put, but WAL_EAGAIN instead of waiting for the handle's mutex or doing
 * any I/O (a full buffer, a new segment): for callers that must not block. */
int wal_put_nowait(wal_t *w, const void *key, size_t klen, const void *val, size_t vlen,
                   uint64_t *lsn_out);

/* Waits until `lsn` (0: everything appended) is durable, sharing the
 * fdatasync with concurrent callers (group commit). *durable_out: durable LSN. */
int wal_sync(wal_t *w, uint64_t lsn, uint64_t *durable_out);

/* Hands the buffer to the OS (write(2)) without fdatasync. */
int wal_flush(wal_t *w);

/* Removes the segments whose records all have LSN <= lsn (never the current
 * one), oldest first, then fsyncs the directory. */
int wal_remove_below(wal_t *w, uint64_t lsn, uint64_t *bytes_removed, uint64_t *segs_removed);

/* Copies the counters (consistent snapshot under the handle's mutex). */
void wal_get_stats(wal_t *w, wal_stats_t *st);

/* ---- reading ---------------------------------------------------------- */

#define WAL_END_NONE 0    /* still reading */
#define WAL_END_CLEAN 1   /* the log ends after the last valid record */
#define WAL_END_TORN 2    /* the last segment ends in an incomplete/garbage record */
#define WAL_END_ERROR 3   /* corruption, mismatch, gap or I/O error: see rc */

typedef struct {
    uint64_t lsn;
    uint64_t synced_lsn;
    uint64_t seg_first_lsn; /* segment holding the record */
    uint64_t offset;        /* byte offset of the record header in it */
    const uint8_t *payload; /* valid until the next call on the reader */
    uint32_t len;
    uint8_t type;
} wal_record_t;

typedef struct {
    int status;             /* WAL_END_* */
    int rc;                 /* WAL_END_ERROR: the error code */
    uint64_t last_lsn;      /* last valid record (0 if none) */
    uint64_t expected_lsn;  /* LSN expected where reading stopped */
    uint64_t seg_first_lsn; /* segment where reading stopped */
    uint64_t offset;        /* byte offset there */
    uint64_t cut_bytes;     /* TORN: bytes after offset up to the last non-zero byte */
    uint64_t later_segments;/* segments after the one where reading stopped */
    uint64_t found_system_id; /* WAL_EMISMATCH: the segment's system_id */
    uint64_t segments;      /* segments read */
    uint64_t bytes;         /* record bytes read */
    uint64_t bytes_read;    /* segment file bytes read from disk */
    int end_hint;           /* WAL_HINT_*: WAL_READ_END_HINT only */
    char path[4096];        /* file where reading stopped ("" if none) */
} wal_end_t;

/* Opens a reader over dir's segments. system_id 0 accepts any. Records with
 * LSN < from_lsn are validated but not returned; reading starts at the last
 * segment whose first LSN <= from_lsn (WAL_EGAP in the end info if none). */
int wal_reader_open(const char *dir, uint64_t system_id, uint64_t from_lsn, wal_reader_t **out);

/* Flags of wal_reader_open_flags. */
#define WAL_READ_END_HINT 1u /* use wal/END when it matches: the newest segment is
                                read only from the latest record known at or below
                                from_lsn up to the hinted end (records before it
                                are then not validated) and the end is taken as
                                clean without reading the zero tail */
#define WAL_READ_COPY 2u     /* the log is a copy whose newest segment was cut at the
                                end of its records (a backup, pieces from an
                                archive): its being shorter than its header
                                records is not WAL_ESHORT; the caller checks the
                                log reaches the LSN the copy recorded */

/* wal_reader_open with flags (WAL_READ_*). Never changes a file. */
int wal_reader_open_flags(const char *dir, uint64_t system_id, uint64_t from_lsn, unsigned flags,
                          wal_reader_t **out);

/* 1: *rec is the next record; 0: the log ended (see wal_reader_end); <0: error. */
int wal_reader_next(wal_reader_t *r, wal_record_t *rec);

/* Up to `max` next records at once, all from one segment (replay's fast path).
 * For record i: lsn[i], type[i], and its payload at base + off[i], len[i] bytes;
 * *base stays valid until the next call on the reader. Returns the count (> 0),
 * 0 when the log ended (see wal_reader_end), or < 0 on error. */
int wal_reader_batch(wal_reader_t *r, size_t max, uint64_t *lsn, uint8_t *type, uint64_t *off,
                     uint64_t *len, const uint8_t **base);

/* Fills *end with how reading ended (status WAL_END_NONE while records remain). */
void wal_reader_end(wal_reader_t *r, wal_end_t *end);

void wal_reader_close(wal_reader_t *r);

/* Cuts the log at (segment seg_first_lsn, offset): wal/END is removed (durably)
 * first; the bytes from offset up to
 * the last non-zero byte are copied into "<segment>.<offset>.broken" (fsynced),
 * every later segment is renamed to "<name>.broken", the directory fsynced;
 * then the cut bytes are zeroed in place (the space stays allocated) and the
 * segment fdatasynced.
 * offset <= WAL_SEG_HDR_SIZE renames the whole segment away. *cut_bytes: bytes kept aside. */
int wal_cut(const char *dir, uint64_t seg_first_lsn, uint64_t offset, uint64_t *cut_bytes);

/* ---- checksums -------------------------------------------------------- */

/* crc32c continuing from `crc` (0 to start), as the Python crc32c package. */
uint32_t wal_crc32c(uint32_t crc, const void *buf, size_t len);
/* 1 if a hardware CRC32C path is in use. */
int wal_crc32c_hw(void);

/* ---- test hooks (inert unless enabled) -------------------------------- */

#define WAL_OP_WRITE 0
#define WAL_OP_FDATASYNC 1
#define WAL_OP_FALLOCATE 2
#define WAL_OP_RENAME 3
#define WAL_OP_UNLINK 4
#define WAL_OP_OPEN 5
#define WAL_OP_READ 6
#define WAL_OP_COUNT 7

/* From the nth matching call on (1-based), `op` fails with -err; `persistent`
 * keeps failing after that, otherwise once. err 0 with op WRITE = short write.
 * nth 0 disables the fault. */
void wal_test_fault(int op, uint64_t nth, int err, int persistent);
/* Number of calls of `op` seen since the fault for it was set. */
uint64_t wal_test_calls(int op);
/* SIGKILLs the process when the named point is reached the nth time (name "" disables). */
void wal_test_killpoint(const char *name, uint64_t nth);
/* Appends "segment offset\n" to file `path` after every successful segment
 * fdatasync ("" disables): the durable prefix of each segment, for power-loss tests. */
int wal_test_sync_trace(const char *path);
/* Calls fn() (in the thread that gets there, no lock held) whenever the named
 * point is reached: a test makes something happen at an exact moment, e.g. a
 * writer's segment switch inside wal_reader_open ("reader_open": between
 * reading LAST and listing the segments). name "" or
 * fn NULL disables. */
void wal_test_callpoint(const char *name, void (*fn)(void));

/* Message for a return code; static storage. */
const char *wal_strerror(int rc);

#endif
