/* Internal declarations shared by the C files of the WAL; not part of the API. */
#ifndef WALSTATE_WAL_INTERNAL_H
#define WALSTATE_WAL_INTERNAL_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>

#include "wal.h"
#include "wal_format.h"

#define WAL_PATH_MAX 4096

static inline uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static inline uint64_t get64(const uint8_t *p)
{
    return (uint64_t)get32(p) | (uint64_t)get32(p + 4) << 32;
}
static inline void put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}
static inline void put64(uint8_t *p, uint64_t v)
{
    put32(p, (uint32_t)v);
    put32(p + 4, (uint32_t)(v >> 32));
}

/* ---- wal_hooks.c: system calls through the fault-injection hooks ---- */
/* Each returns 0 / byte count, or -errno (never sets errno for callers). */
int h_open(const char *path, int flags, int mode);
int h_pwrite_all(int fd, const void *buf, size_t len, uint64_t off);
int h_pread_all(int fd, void *buf, size_t len, uint64_t off);
int h_fdatasync(int fd);
int h_fsync(int fd);
int h_fallocate(int fd, uint64_t len);
int h_rename(const char *from, const char *to);
int h_unlink(const char *path);
/* 1 while a test injects errors on the nth call (the counts must stay those of
 * the foreground's calls: no segment is made ahead then). */
int h_faults_armed(void);
/* The calling thread's system calls are neither counted nor failed by
 * wal_test_fault (the preparer: a fault a test injects is meant for the
 * foreground's nth call, and a spare being made when it is armed must not
 * take it -- it would poison the log behind the foreground's back). */
void h_untracked_thread(void);
void h_killpoint(const char *name);
void h_callpoint(const char *name);
void h_sync_trace(uint64_t seg_first_lsn, uint64_t offset);

/* ---- wal_segment.c: naming, creation, listing, directory fsync ---- */
typedef struct {
    uint64_t first_lsn;
    uint64_t prev_lsn; /* LSN of the last record before this segment (continuity) */
    uint64_t system_id;
    uint64_t nonce;
    uint64_t segment_size;
    uint32_t salt; /* the header's crc: seeds every record crc in the segment */
} seg_header_t;

void seg_name(char *out, size_t cap, const char *dir, uint64_t first_lsn);
/* Parses a directory entry name; 1 and *first_lsn if it is a segment name. */
int seg_parse_name(const char *name, uint64_t *first_lsn);
/* Sorted first LSNs of dir's segments. *out is malloc'ed (caller frees). */
int seg_list(const char *dir, uint64_t **out, size_t *n);
int dir_fsync(const char *dir);
/* Removes what a crash can leave in dir: *.seg.tmp (a segment being created),
 * spare-*.tmp (one made ahead), LAST.tmp, END.tmp; fsyncs dir if any went. */
int seg_remove_tmp(const char *dir);
/* Encodes a header into 64 bytes and fills h->salt. */
void seg_encode_header(uint8_t *buf, seg_header_t *h);
/* 0 valid, WAL_ECORRUPT / WAL_EVERSION otherwise. */
int seg_decode_header(const uint8_t *buf, size_t len, seg_header_t *h);
/* Creates a segment atomically (tmp, preallocate, header, fdatasync, rename,
 * dir fsync). Returns the open fd (>= 0) or a negative code. */
int seg_create(const char *dir, seg_header_t *h, uint64_t alloc_size);
/* The next segment's file made ahead of time, at `path` (dir/spare-*.tmp: a
 * *.tmp, so wal_open removes a leftover; cap >= WAL_PATH_MAX + 64):
 * allocated, zero-filled and fsynced, no header. Returns its fd, or a negative
 * errno (nothing left behind). */
int seg_spare_make(const char *dir, uint64_t size, char *path, size_t cap);
/* seg_create from a spare (fd and path of seg_spare_make, big enough): header,
 * fsync, rename, LAST -- the same steps and crash states as seg_create after
 * its zero fill. Consumes spare_fd (closed on failure). Returns the segment's
 * fd or a negative errno. */
int seg_create_from_spare(const char *dir, seg_header_t *h, int spare_fd, const char *path);
/* wal/LAST (first LSN of the newest segment created): 0 and *lsn; 1 if there is
 * none; WAL_ECORRUPT if unreadable; -errno. */
int last_read(const char *dir, uint64_t *lsn);
/* Publishes LAST = lsn (temp file, fsync, rename, directory fsync). */
int last_write(const char *dir, uint64_t lsn);
/* Removes LAST (no segment is left) and fsyncs the directory. */
int last_remove(const char *dir);
/* Reads a file into a malloc'ed buffer, up to where its data ends: *len may be
 * less than the file size (*size_out, if not NULL); the bytes after are zeros. */
/* Opens path read-only: *fd and its size, or a negative errno (nothing open). */
int file_open_sized(const char *path, int *fd, uint64_t *size);
int file_read_all(const char *path, uint8_t **buf, size_t *len, uint64_t *size_out);

/* ---- wal_endhint.c: wal/END, where a cleanly closed log ends ---- */
typedef struct {
    uint64_t system_id;
    uint64_t seg_first_lsn; /* the segment the log ends in (the newest) */
    uint32_t salt;          /* its header crc: binds the hint to that file */
    uint32_t nmarks;
    uint64_t end;           /* byte offset where the log ends */
    uint64_t last_lsn;      /* LSN of the record ending there */
    uint64_t last_off;      /* offset of that record's header */
    uint64_t mark_lsn[WAL_END_MARKS], mark_off[WAL_END_MARKS]; /* other known records */
} end_hint_t;

/* WAL_HINT_USED: *h parsed and is plausible; WAL_HINT_NONE: no END;
 * WAL_HINT_IGNORED: END exists but is unreadable or garbage. Never fails. */
int endhint_read(const char *dir, end_hint_t *h);
/* Publishes END (temp file, fsync, rename, directory fsync). */
int endhint_write(const char *dir, const end_hint_t *h);
/* Removes END if present, durably (unlink, directory fsync). */
int endhint_remove(const char *dir);
/* Reads the hinted segment `path` from the latest known record at or below
 * from_lsn up to the hinted end + WAL_END_TAIL_CHECK, and checks it against
 * the hint (header and salt, a valid chain of records up to the hinted one
 * ending exactly at the end, zeros after). 0: *buf (malloc'ed) holds file
 * bytes [*base, *base + *len) starting with the record *start_lsn, *hdr the
 * header; 1: the hint does not match (nothing allocated); < 0: I/O error.
 * *bytes_read grows by the bytes read. */
int endhint_load(const char *path, const end_hint_t *h, uint64_t from_lsn, seg_header_t *hdr,
                 uint8_t **buf, uint64_t *base, size_t *len, uint64_t *start_lsn,
                 uint64_t *size_out, uint64_t *bytes_read);

/* ---- wal_record.c: records, encoded and parsed ---- */
/* 1 if a valid record starts at buf[off] (fully inside buf[0..len)), filling rec. */
int rec_parse(const uint8_t *buf, size_t len, size_t off, uint32_t salt, wal_record_t *rec);
/* A part of a record's payload. */
typedef struct {
    const void *p;
    size_t n;
} wal_piece_t;
/* Encodes a record at r (WAL_REC_HDR_SIZE + plen bytes): the header, the
 * pieces' bytes (plen in all) and the crc seeded with the segment's salt. */
void rec_encode(uint8_t *r, uint32_t salt, unsigned type, uint64_t lsn, uint64_t synced_lsn,
                const wal_piece_t *pc, int npc, size_t plen);


/* ---- the log handle: wal_writer.c (append, buffer), wal_sync.c (group
 * commit), wal_prepare.c (the next segment made ahead), wal_open.c (open,
 * end, close) ---- */
struct wal {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    char dir[WAL_PATH_MAX];
    uint64_t system_id, segment_size;
    uint64_t covered_lsn; /* the snapshot holds every record up to it (wal_options_t) */
    int fd;              /* current segment */
    seg_header_t hdr;    /* of the current segment */
    uint64_t seg_alloc;  /* its size on disk (preallocated) */
    uint64_t file_off;   /* where buf[0] lands in it */
    uint8_t *buf, *spare;
    size_t buf_len, buf_cap, spare_cap;
    int write_busy;      /* one thread writes the buffer at a time, mutex released */
    int syncs_in_flight; /* fdatasyncs running with the mutex released */
    uint64_t sync_cover; /* highest target of any fdatasync started */
    int sync_waiters;    /* threads inside wal_sync */
    int delaying;        /* a leader waits for its group (group_delay) */
    pthread_cond_t arrive_cv; /* CLOCK_MONOTONIC; signalled when a thread enters wal_sync */
    int group_ring[4];   /* sync_waiters when each of the last 4 fdatasyncs started */
    unsigned group_pos;
    uint64_t fsync_ewma_ns; /* recent fdatasync time (moving average) */
    /* The next segment's file, made ahead by the preparer thread once the
     * current segment is half full, so that a rotation does not write a whole
     * segment of zeros while every writer waits (docs/FORMAT.md, "WAL segment"). */
    int next_fd;         /* ready: >= 0, next_size bytes at next_path */
    uint64_t next_size;
    char next_path[WAL_PATH_MAX + 64];
    int prep_state;      /* PREP_NONE, PREP_IDLE, PREP_WANTED, PREP_BUSY, PREP_OFF */
    int prep_stop;
    pthread_t prep;
    pthread_cond_t prep_cv;
    int poisoned;
    uint64_t next_lsn, written_lsn, durable_lsn, seg_synced;
    uint64_t appends, bytes_appended, fsyncs, writes, segments_created;
    uint64_t fsync_ns_total, fsync_ns_max, fsync_hist[WAL_FSYNC_BUCKETS];
    /* known record positions in the current segment, for wal/END: the last
     * record (0: none yet), and one every mark_stride bytes */
    uint64_t last_rec_off, mark_next, mark_stride;
    uint32_t nmarks;
    uint64_t mark_lsn[WAL_END_MARKS], mark_off[WAL_END_MARKS];
    uint64_t open_bytes_read;
    int end_hint;
    int end_pending;     /* wal/END (used at open) still on disk: removed before
                          * the first append, kept by a close with none */
};

/* A record with LSN lsn starts at offset off of the current segment. */
static inline void wal_note_record(wal_t *w, uint64_t lsn, uint64_t off)
{
    w->last_rec_off = off;
    if (off >= w->mark_next && w->nmarks < WAL_END_MARKS) {
        w->mark_lsn[w->nmarks] = lsn;
        w->mark_off[w->nmarks++] = off;
        w->mark_next = off + w->mark_stride;
    }
}

/* Requires mu. Records the first failure; later calls see WAL_EPOISONED. */
static inline void wal_poison(wal_t *w, int rc)
{
    if (!w->poisoned)
        w->poisoned = rc;
}

/* wal_t.prep_state (wal_prepare.c) */
enum { PREP_NONE, PREP_IDLE, PREP_WANTED, PREP_BUSY, PREP_OFF };

/* wal_sync.c: group commit and fsync statistics */
uint64_t wal_now_ns(void);
/* Requires mu. Counts an fdatasync that took ns. */
void wal_note_fsync(wal_t *w, uint64_t ns);
/* Requires mu (released while waiting and during fdatasync). Returns once
 * `lsn` is durable (0), or the error that poisoned the log. */
int wal_sync_locked(wal_t *w, uint64_t lsn);
/* Requires mu. Waits until no write or fdatasync is running (they use w->fd). */
void wal_quiesce_locked(wal_t *w);

/* wal_writer.c */
/* Requires mu (released while waiting and during the write). Writes what is
 * buffered; afterwards everything appended before the call is written.
 * Returns 0 or the error (poisoning). */
int wal_write_locked(wal_t *w);
/* A new current segment of `alloc` bytes: no record known in it yet. */
void wal_marks_reset(wal_t *w, uint64_t alloc);

/* wal_prepare.c: the next segment's file, made ahead by a thread */
/* Requires mu. Asks for the next segment's file once the current one is half
 * full (not while a test injects faults: its counts are the foreground's). */
void wal_prepare_next(wal_t *w);
/* Stops the preparer and removes an unused file it made. mu not held. */
void wal_prep_shutdown(wal_t *w);

#endif
