/* Internal declarations shared by the C files of the WAL; not part of the API. */
#ifndef WALSTATE_WAL_INTERNAL_H
#define WALSTATE_WAL_INTERNAL_H

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
void h_killpoint(const char *name);
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
 * errno (nothing left behind; *allocated: whether it failed after the space
 * was allocated -- a write or fsync that failed, not a full disk). */
int seg_spare_make(const char *dir, uint64_t size, char *path, size_t cap, int *allocated);
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

#endif
