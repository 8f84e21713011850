/* Appending: records are encoded into a user-space buffer under the handle's
 * mutex. Whoever needs the bytes on disk swaps the buffer out and writes it
 * with the mutex released (one writer at a time: write_busy) while others
 * keep appending into the other buffer. Durability: a thread whose record is
 * written but not yet covered by an fdatasync starts one (with the mutex
 * released); every thread whose record an in-flight fdatasync covers sleeps
 * on one condition variable (group commit). fdatasync covers every write
 * that completed before it was called, so several may be in flight at once
 * (pipelining: on disks where concurrent flushes overlap this beats keeping
 * one in flight), and the durable LSN is the highest target completed.
 *
 * Failure policy (PostgreSQL's fsyncgate lesson): a failed write or
 * fdatasync poisons the handle. The page cache may have dropped the dirty
 * pages, so retrying the fsync could "succeed" over lost data: nothing is
 * acknowledged any more until the log is reopened and re-read from disk.
 * The one clean failure is ENOSPC while creating a segment: the old segment
 * is complete and synced, no byte of the record was written.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "wal_internal.h"

struct wal {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    char dir[WAL_PATH_MAX];
    uint64_t system_id, segment_size;
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

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void note_fsync(wal_t *w, uint64_t ns)
{
    uint64_t us = ns / 1000;
    int b = 0;
    while (us > 1 && b < WAL_FSYNC_BUCKETS - 1) {
        us >>= 1;
        b++;
    }
    w->fsync_hist[b]++;
    w->fsync_ewma_ns = w->fsync_ewma_ns ? (w->fsync_ewma_ns * 7 + ns) / 8 : ns;
    w->fsync_ns_total += ns;
    if (ns > w->fsync_ns_max)
        w->fsync_ns_max = ns;
    w->fsyncs++;
}

/* A new current segment of `alloc` bytes: no record known in it yet. */
static void marks_reset(wal_t *w, uint64_t alloc)
{
    w->mark_stride = alloc / WAL_END_MARKS;
    if (w->mark_stride < 4096)
        w->mark_stride = 4096;
    w->mark_next = WAL_SEG_HDR_SIZE + w->mark_stride;
    w->nmarks = 0;
    w->last_rec_off = 0;
}

/* A record with LSN lsn starts at offset off of the current segment. */
static inline void note_record(wal_t *w, uint64_t lsn, uint64_t off)
{
    w->last_rec_off = off;
    if (off >= w->mark_next && w->nmarks < WAL_END_MARKS) {
        w->mark_lsn[w->nmarks] = lsn;
        w->mark_off[w->nmarks++] = off;
        w->mark_next = off + w->mark_stride;
    }
}

/* Requires mu. Records the first failure; later calls see WAL_EPOISONED. */
static void poison(wal_t *w, int rc)
{
    if (!w->poisoned)
        w->poisoned = rc;
}

enum { PREP_NONE, PREP_IDLE, PREP_WANTED, PREP_BUSY, PREP_OFF };

/* The preparer thread: makes the next segment's file whenever asked. */
static void *prep_main(void *arg)
{
    wal_t *w = arg;
    pthread_mutex_lock(&w->mu);
    while (!w->prep_stop) {
        if (w->prep_state != PREP_WANTED) {
            pthread_cond_wait(&w->prep_cv, &w->mu);
            continue;
        }
        if (h_faults_armed()) { /* a test's fault counts are the foreground's */
            w->prep_state = PREP_IDLE;
            continue;
        }
        w->prep_state = PREP_BUSY;
        uint64_t size = w->segment_size;
        char path[WAL_PATH_MAX + 64];
        pthread_mutex_unlock(&w->mu);
        int allocated;
        int fd = seg_spare_make(w->dir, size, path, sizeof path, &allocated);
        (void)allocated;
        pthread_mutex_lock(&w->mu);
        w->prep_state = PREP_IDLE;
        if (fd >= 0 && w->next_fd < 0 && !w->prep_stop) {
            w->next_fd = fd;
            w->next_size = size;
            memcpy(w->next_path, path, sizeof w->next_path);
        } else if (fd >= 0) {
            close(fd);
            unlink(path);
        }
        /* A spare that failed (full disk, EIO, even after its space was
         * granted) is removed by seg_spare_make and poisons nothing: no record
         * is in it and nothing acknowledged depends on it. The log's own
         * blocks are covered by the log's own fdatasync, which reports their
         * failure to the writer waiting for it; the rotation then creates the
         * segment itself, in the foreground, and reports what fails there. */
    }
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

/* Requires mu. Asks for the next segment's file once the current one is half
 * full (not while a test injects faults: its counts are the foreground's). */
static void maybe_prepare_next(wal_t *w)
{
    if (w->next_fd >= 0 || w->prep_state == PREP_WANTED || w->prep_state == PREP_BUSY ||
        w->prep_state == PREP_OFF || (w->file_off + w->buf_len) * 2 < w->seg_alloc ||
        h_faults_armed())
        return;
    if (w->prep_state == PREP_NONE) {
        pthread_attr_t a;
        pthread_attr_init(&a);
        pthread_attr_setstacksize(&a, 256 * 1024);
        int rc = pthread_create(&w->prep, &a, prep_main, w);
        pthread_attr_destroy(&a);
        if (rc != 0) {
            w->prep_state = PREP_OFF; /* rotations create segments themselves */
            return;
        }
    }
    w->prep_state = PREP_WANTED;
    pthread_cond_signal(&w->prep_cv);
}

/* Stops the preparer and removes an unused file it made. mu not held. */
static void prep_shutdown(wal_t *w)
{
    pthread_mutex_lock(&w->mu);
    int started = w->prep_state != PREP_NONE && w->prep_state != PREP_OFF;
    w->prep_stop = 1;
    pthread_cond_signal(&w->prep_cv);
    pthread_mutex_unlock(&w->mu);
    if (started)
        pthread_join(w->prep, NULL);
    if (w->next_fd >= 0) {
        close(w->next_fd);
        unlink(w->next_path); /* best effort; wal_open removes *.tmp leftovers */
        w->next_fd = -1;
    }
}

/* fdatasyncs allowed in flight at once. Measured here (ext4 on a virtual
 * disk, 2000 synced appends): 4 threads 22k/s with 1 in flight, 19k/s with 2,
 * 15k/s with 4 -- concurrent fdatasyncs of one file serialize in the journal,
 * so pipelining only splits the groups. Kept as a knob for other disks. */
#define MAX_SYNCS_IN_FLIGHT 1

/* Requires mu (released while waiting and during the write). Writes what is
 * buffered; afterwards everything appended before the call is written.
 * Returns 0 or the error (poisoning). */
static int write_locked(wal_t *w)
{
    while (w->write_busy)
        pthread_cond_wait(&w->cv, &w->mu);
    if (w->poisoned)
        return WAL_EPOISONED;
    size_t len = w->buf_len, cap = w->buf_cap;
    if (len == 0)
        return 0;
    uint64_t target = w->next_lsn - 1, off = w->file_off;
    uint8_t *data = w->buf;
    int fd = w->fd;
    w->buf = w->spare;
    w->buf_cap = w->spare_cap;
    w->buf_len = 0;
    w->spare = NULL;
    w->spare_cap = 0;
    w->file_off += len;
    w->write_busy = 1;
    pthread_mutex_unlock(&w->mu);

    int rc = h_pwrite_all(fd, data, len, off);
    h_killpoint("append_after_write");

    pthread_mutex_lock(&w->mu);
    w->spare = data;
    w->spare_cap = cap;
    w->write_busy = 0;
    if (rc) {
        poison(w, rc);
    } else {
        w->writes++;
        w->written_lsn = target;
    }
    pthread_cond_broadcast(&w->cv);
    return rc;
}

/* Requires mu (released while waiting). Group commit's commit delay (as
 * PostgreSQL's commit_delay, but adaptive): when recent fdatasyncs started with
 * more threads waiting on them than wait now, the thread about to start one
 * waits a little -- until as many have come, or half the recent fdatasync time
 * (at most 1 ms) -- so that one fdatasync covers them all instead of every
 * other one covering a single thread. A lone writer never waits. Returns 1 if
 * it waited. */
static int group_delay(wal_t *w)
{
    int want = 0;
    for (size_t i = 0; i < sizeof w->group_ring / sizeof w->group_ring[0]; i++)
        if (w->group_ring[i] > want)
            want = w->group_ring[i];
    if (w->sync_waiters >= want || w->fsync_ewma_ns == 0)
        return 0;
    uint64_t wait = w->fsync_ewma_ns / 2;
    if (wait > 1000000)
        wait = 1000000;
    struct timespec dl;
    clock_gettime(CLOCK_MONOTONIC, &dl);
    uint64_t ns = (uint64_t)dl.tv_nsec + wait;
    dl.tv_sec += (time_t)(ns / 1000000000ull);
    dl.tv_nsec = (long)(ns % 1000000000ull);
    w->delaying = 1;
    while (w->sync_waiters < want && !w->poisoned)
        if (pthread_cond_timedwait(&w->arrive_cv, &w->mu, &dl) == ETIMEDOUT)
            break;
    w->delaying = 0;
    pthread_cond_broadcast(&w->cv);  /* those who waited for the delay */
    return 1;
}

/* Requires mu (released while waiting and during fdatasync). Returns once
 * `lsn` is durable (0), or the error that poisoned the log. */
static int sync_locked(wal_t *w, uint64_t lsn)
{
    int delayed = 0;
    for (;;) {
        if (w->durable_lsn >= lsn)
            return 0;
        if (w->poisoned)
            return WAL_EPOISONED;
        /* an fdatasync that started after our record was written will cover it
         * (sync_cover >= lsn with durable_lsn < lsn means it is still running) */
        if (w->sync_cover >= lsn) {
            pthread_cond_wait(&w->cv, &w->mu);
            continue;
        }
        if (w->written_lsn < lsn) {
            if (w->write_busy) {
                pthread_cond_wait(&w->cv, &w->mu);
                continue;
            }
            int rc = write_locked(w);
            if (rc)
                return rc;
            continue;
        }
        if (w->syncs_in_flight >= MAX_SYNCS_IN_FLIGHT || w->delaying) {
            pthread_cond_wait(&w->cv, &w->mu);
            continue;
        }
        if (!delayed) {
            delayed = 1;
            if (group_delay(w)) {
                /* the group's records into the file, then look again */
                if (w->buf_len && !w->write_busy) {
                    int rc = write_locked(w);
                    if (rc)
                        return rc;
                }
                continue;
            }
        }
        uint64_t target = w->written_lsn, seg = w->hdr.first_lsn, end = w->file_off;
        int fd = w->fd;
        w->group_ring[w->group_pos++ % (sizeof w->group_ring / sizeof w->group_ring[0])] =
            w->sync_waiters;
        w->syncs_in_flight++;
        w->sync_cover = target;
        pthread_mutex_unlock(&w->mu);

        uint64_t t0 = now_ns();
        int rc = h_fdatasync(fd);
        uint64_t ns = now_ns() - t0;
        if (rc == 0)
            h_sync_trace(seg, end);
        h_killpoint("append_after_fdatasync");

        pthread_mutex_lock(&w->mu);
        w->syncs_in_flight--;
        if (rc) {
            poison(w, rc);
        } else {
            note_fsync(w, ns);
            if (target > w->durable_lsn) {
                w->durable_lsn = target;
                if (end > w->seg_synced)
                    w->seg_synced = end;
            }
        }
        pthread_cond_broadcast(&w->cv);
        if (rc)
            return rc;
    }
}

/* Requires mu. Waits until no write or fdatasync is running (they use w->fd). */
static void quiesce_locked(wal_t *w)
{
    while (w->write_busy || w->syncs_in_flight)
        pthread_cond_wait(&w->cv, &w->mu);
}

/* Requires mu, held throughout (rotation is rare). Completes and syncs the
 * current segment -- a reader treats a segment followed by another as whole
 * -- then creates the next, large enough for a record of `need` bytes. */
static int rotate_locked(wal_t *w, uint64_t need)
{
    quiesce_locked(w);
    if (w->poisoned)
        return WAL_EPOISONED;
    w->write_busy = 1;
    int rc = 0;
    if (w->buf_len)
        rc = h_pwrite_all(w->fd, w->buf, w->buf_len, w->file_off);
    if (rc == 0 && w->seg_synced < w->file_off + w->buf_len) {
        uint64_t t0 = now_ns();
        rc = h_fdatasync(w->fd);
        if (rc == 0) {
            note_fsync(w, now_ns() - t0);
            h_sync_trace(w->hdr.first_lsn, w->file_off + w->buf_len);
        }
    }
    if (rc) {
        poison(w, rc);
        w->write_busy = 0;
        pthread_cond_broadcast(&w->cv);
        return rc;
    }
    w->file_off += w->buf_len;
    if (w->buf_len)
        w->writes++;
    w->buf_len = 0;
    w->written_lsn = w->durable_lsn = w->next_lsn - 1;
    w->seg_synced = w->file_off;
    h_killpoint("rotate_after_sync");

    seg_header_t h = {.first_lsn = w->next_lsn, .prev_lsn = w->next_lsn - 1,
                      .system_id = w->system_id, .segment_size = w->segment_size};
    uint64_t alloc = w->segment_size;
    if (WAL_SEG_HDR_SIZE + need > alloc)
        alloc = WAL_SEG_HDR_SIZE + need; /* one oversized segment holds a huge record */
    int fd;
    if (w->next_fd >= 0 && alloc <= w->next_size) {
        fd = seg_create_from_spare(w->dir, &h, w->next_fd, w->next_path);
        w->next_fd = -1;
    } else {
        fd = seg_create(w->dir, &h, alloc);
    }
    w->write_busy = 0;
    pthread_cond_broadcast(&w->cv);
    if (fd < 0) {
        /* A full disk is clean: the old segment is whole and synced, the caller
         * may retry once space is freed. Anything else (EIO, a file system gone
         * read-only) means a failing device: nothing more is acknowledged. */
        if (fd != -ENOSPC && fd != -EDQUOT)
            poison(w, fd);
        return fd;
    }
    close(w->fd);
    w->fd = fd;
    w->hdr = h;
    w->seg_alloc = alloc;
    w->file_off = w->seg_synced = WAL_SEG_HDR_SIZE;
    w->segments_created++;
    marks_reset(w, alloc);
    h_killpoint("rotate_after_create");
    return 0;
}

struct piece {
    const void *p;
    size_t n;
};

/* nowait: return WAL_EAGAIN instead of waiting for the mutex or doing any I/O
 * (a caller that holds the GIL must not block). */
static int append_pieces(wal_t *w, unsigned type, const struct piece *pc, int npc,
                         uint64_t *lsn_out, int nowait)
{
    size_t plen = 0;
    for (int i = 0; i < npc; i++) {
        if (pc[i].n && !pc[i].p)
            return WAL_EINVAL;
        plen += pc[i].n;
        if (plen > WAL_REC_MAX_PAYLOAD)
            return WAL_ETOOBIG;
    }
    if (type == 0 || type > 255)
        return WAL_EINVAL;
    size_t need = WAL_REC_HDR_SIZE + plen;
    int rc = 0;
    if (!nowait)
        pthread_mutex_lock(&w->mu);
    else if (pthread_mutex_trylock(&w->mu) != 0)
        return WAL_EAGAIN;
    for (;;) {
        if (w->poisoned) {
            rc = WAL_EPOISONED;
            break;
        }
        if (w->end_pending) { /* the first append: wal/END goes first, durably */
            if (nowait) {
                rc = WAL_EAGAIN;
                break;
            }
            if ((rc = endhint_remove(w->dir)) != 0)
                break; /* nothing appended; the next append tries again */
            w->end_pending = 0;
            continue;
        }
        if (nowait && (w->file_off + w->buf_len + need > w->seg_alloc ||
                       w->buf_len + need > w->buf_cap)) {
            rc = WAL_EAGAIN;
            break;
        }
        if (w->file_off + w->buf_len + need > w->seg_alloc) {
            if ((rc = rotate_locked(w, need)) != 0)
                break;
            continue;
        }
        if (w->buf_len && w->buf_len + need > w->buf_cap) {
            if ((rc = write_locked(w)) != 0)
                break;
            continue;
        }
        break;
    }
    if (rc == 0 && need > w->buf_cap) {
        uint8_t *nb = realloc(w->buf, need);
        if (!nb)
            rc = -ENOMEM;
        else {
            w->buf = nb;
            w->buf_cap = need;
        }
    }
    if (rc) {
        pthread_mutex_unlock(&w->mu);
        return rc;
    }
    maybe_prepare_next(w);
    uint8_t *r = w->buf + w->buf_len;
    uint64_t lsn = w->next_lsn++;
    note_record(w, lsn, w->file_off + w->buf_len);
    put32(r + 4, (uint32_t)plen);
    put64(r + 8, lsn);
    put64(r + 16, w->durable_lsn);
    r[24] = (uint8_t)type;
    r[25] = r[26] = r[27] = 0;
    uint8_t *q = r + WAL_REC_HDR_SIZE;
    for (int i = 0; i < npc; i++) {
        if (pc[i].n)
            memcpy(q, pc[i].p, pc[i].n);
        q += pc[i].n;
    }
    put32(r, wal_crc32c(w->hdr.salt, r + 4, need - 4));
    w->buf_len += need;
    w->appends++;
    w->bytes_appended += need;
    pthread_mutex_unlock(&w->mu);
    *lsn_out = lsn;
    return 0;
}

int wal_append(wal_t *w, unsigned type, const void *a, size_t alen, const void *b, size_t blen,
               uint64_t *lsn_out)
{
    struct piece pc[2] = {{a, alen}, {b, blen}};
    return append_pieces(w, type, pc, 2, lsn_out, 0);
}

/* PUT payload = u16 key length || key || value. */
static int put_record(wal_t *w, const void *key, size_t klen, const void *val, size_t vlen,
                      uint64_t *lsn_out, int nowait)
{
    if (klen == 0 || klen > 0xffff)
        return WAL_EINVAL;
    uint8_t kl[2] = {(uint8_t)klen, (uint8_t)(klen >> 8)};
    struct piece pc[3] = {{kl, 2}, {key, klen}, {val, vlen}};
    return append_pieces(w, WAL_TYPE_PUT, pc, 3, lsn_out, nowait);
}

int wal_put(wal_t *w, const void *key, size_t klen, const void *val, size_t vlen,
            uint64_t *lsn_out)
{
    return put_record(w, key, klen, val, vlen, lsn_out, 0);
}

int wal_put_nowait(wal_t *w, const void *key, size_t klen, const void *val, size_t vlen,
                   uint64_t *lsn_out)
{
    return put_record(w, key, klen, val, vlen, lsn_out, 1);
}

int wal_sync(wal_t *w, uint64_t lsn, uint64_t *durable_out)
{
    int rc = 0;
    pthread_mutex_lock(&w->mu);
    if (lsn == 0 || lsn >= w->next_lsn)
        lsn = w->next_lsn - 1;
    w->sync_waiters++;
    if (w->delaying)
        pthread_cond_signal(&w->arrive_cv);
    rc = sync_locked(w, lsn);
    w->sync_waiters--;
    if (durable_out)
        *durable_out = w->durable_lsn;
    pthread_mutex_unlock(&w->mu);
    return rc;
}

int wal_flush(wal_t *w)
{
    pthread_mutex_lock(&w->mu);
    int rc = write_locked(w);
    pthread_mutex_unlock(&w->mu);
    return rc;
}

void wal_get_stats(wal_t *w, wal_stats_t *st)
{
    pthread_mutex_lock(&w->mu);
    memset(st, 0, sizeof *st);
    st->next_lsn = w->next_lsn;
    st->written_lsn = w->written_lsn;
    st->durable_lsn = w->durable_lsn;
    st->appends = w->appends;
    st->bytes_appended = w->bytes_appended;
    st->fsyncs = w->fsyncs;
    st->writes = w->writes;
    st->segments_created = w->segments_created;
    st->seg_first_lsn = w->hdr.first_lsn;
    st->seg_end = w->file_off + w->buf_len;
    st->seg_synced = w->seg_synced;
    st->fsync_ns_total = w->fsync_ns_total;
    st->fsync_ns_max = w->fsync_ns_max;
    memcpy(st->fsync_hist, w->fsync_hist, sizeof st->fsync_hist);
    st->poisoned = w->poisoned;
    st->open_bytes_read = w->open_bytes_read;
    st->end_hint = w->end_hint;
    pthread_mutex_unlock(&w->mu);
}

int wal_remove_below(wal_t *w, uint64_t lsn, uint64_t *bytes_removed, uint64_t *segs_removed)
{
    *bytes_removed = *segs_removed = 0;
    pthread_mutex_lock(&w->mu);
    uint64_t cur = w->hdr.first_lsn;
    pthread_mutex_unlock(&w->mu);
    uint64_t *segs;
    size_t n;
    int rc = seg_list(w->dir, &segs, &n);
    if (rc < 0)
        return rc;
    /* Oldest first, so that a crash half-way leaves a contiguous log. Segment i
     * holds LSNs below segs[i+1]; the current segment is never removed. */
    for (size_t i = 0; i + 1 < n && segs[i] < cur && segs[i + 1] <= lsn + 1; i++) {
        char path[WAL_PATH_MAX + 64];
        struct stat st;
        seg_name(path, sizeof path, w->dir, segs[i]);
        uint64_t size = stat(path, &st) == 0 ? (uint64_t)st.st_size : 0;
        h_killpoint("remove_before_unlink");
        if ((rc = h_unlink(path)) < 0)
            break;
        *bytes_removed += size;
        (*segs_removed)++;
    }
    free(segs);
    if (*segs_removed) {
        int rc2 = dir_fsync(w->dir);
        if (rc == 0)
            rc = rc2;
        h_killpoint("remove_after_fsync");
    }
    return rc;
}

/* Removes *.tmp left by a crash during segment creation. */
static int remove_tmp(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d)
        return -errno;
    struct dirent *e;
    int removed = 0, rc = 0;
    while ((e = readdir(d)) != NULL) {
        size_t n = strlen(e->d_name);
        uint64_t lsn;
        if (strcmp(e->d_name, WAL_LAST_NAME ".tmp") == 0 ||
            strcmp(e->d_name, WAL_END_NAME ".tmp") == 0 ||
            (n == 26 && strncmp(e->d_name, "spare-", 6) == 0 &&
             strspn(e->d_name + 6, "0123456789abcdef") == 16 &&
             strcmp(e->d_name + 22, ".tmp") == 0)) { /* a next segment made ahead */
            char path[WAL_PATH_MAX + 64];
            snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
            if ((rc = h_unlink(path)) < 0)
                break;
            removed = 1;
            continue;
        }
        if (n == WAL_SEG_NAME_LEN + 4 && strcmp(e->d_name + WAL_SEG_NAME_LEN, ".tmp") == 0) {
            char name[WAL_SEG_NAME_LEN + 1];
            memcpy(name, e->d_name, WAL_SEG_NAME_LEN);
            name[WAL_SEG_NAME_LEN] = 0;
            if (!seg_parse_name(name, &lsn))
                continue;
            char path[WAL_PATH_MAX + 64];
            snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
            if ((rc = h_unlink(path)) < 0)
                break;
            removed = 1;
        }
    }
    closedir(d);
    if (rc == 0 && removed)
        rc = dir_fsync(dir);
    return rc;
}

/* Requires the last segment loaded in buf: finds where its records end,
 * noting the records it passes (marks). */
static int find_end(wal_t *w, const uint8_t *buf, size_t len, const seg_header_t *h,
                    uint64_t *next_lsn, size_t *end)
{
    wal_record_t rec;
    size_t off = WAL_SEG_HDR_SIZE;
    uint64_t expected = h->first_lsn;
    while (rec_parse(buf, len, off, h->salt, &rec) && rec.lsn == expected) {
        note_record(w, rec.lsn, off);
        off += WAL_REC_HDR_SIZE + rec.len;
        expected++;
    }
    for (size_t i = off; i < len; i++)
        if (buf[i])
            return WAL_ETORN;
    *next_lsn = expected;
    *end = off;
    return 0;
}

/* The end from wal/END (*hint, already removed from disk) when it matches
 * the segment: 0 (w's position set), 1 no match, < 0 an I/O error. Reads only
 * from the latest mark before the last record: the chain from there to the
 * end is checked, and the zeros after it. */
static int open_hinted(wal_t *w, const char *path, const end_hint_t *hint)
{
    seg_header_t h;
    uint8_t *buf;
    uint64_t base, start_lsn, size;
    size_t len;
    int rc = endhint_load(path, hint, hint->last_lsn - 1, &h, &buf, &base, &len, &start_lsn,
                          &size, &w->open_bytes_read);
    if (rc != 0)
        return rc;
    free(buf);
    if (h.system_id != w->system_id)
        return 1; /* the full scan reports the mismatch */
    w->hdr = h;
    w->seg_alloc = size;
    w->file_off = w->seg_synced = hint->end;
    w->next_lsn = hint->last_lsn + 1;
    marks_reset(w, size);
    for (uint32_t i = 0; i < hint->nmarks; i++)
        note_record(w, hint->mark_lsn[i], hint->mark_off[i]);
    note_record(w, hint->last_lsn, hint->last_off);
    return 0;
}

static int open_last(wal_t *w, uint64_t first_lsn, const end_hint_t *hint)
{
    char path[WAL_PATH_MAX + 64];
    uint8_t *buf;
    size_t len, end = 0;
    uint64_t next = 0, size = 0;
    seg_name(path, sizeof path, w->dir, first_lsn);
    int rc = 1;
    if (hint) {
        rc = open_hinted(w, path, hint);
        if (rc < 0)
            return rc;
        w->end_hint = rc == 0 ? WAL_HINT_USED : WAL_HINT_IGNORED;
    }
    if (rc != 0) {
        rc = file_read_all(path, &buf, &len, &size);
        if (rc < 0)
            return rc;
        w->open_bytes_read += len;
        rc = seg_decode_header(buf, len, &w->hdr);
        if (rc == 0 && w->hdr.system_id != w->system_id)
            rc = WAL_EMISMATCH;
        if (rc == 0 && w->hdr.first_lsn != first_lsn)
            rc = WAL_ECORRUPT;
        if (rc == 0) {
            marks_reset(w, size);
            rc = find_end(w, buf, len, &w->hdr, &next, &end);
        }
        free(buf);
        if (rc < 0)
            return rc;
        w->seg_alloc = size;
        w->file_off = w->seg_synced = end;
        w->next_lsn = next;
    }
    int fd = h_open(path, O_RDWR, 0);
    if (fd < 0)
        return fd;
    /* what a killed process left in the page cache becomes durable now (not
     * after a clean close, whose END is written once everything was durable,
     * and removed before anything is appended again) */
    if (w->end_hint != WAL_HINT_USED && (rc = h_fdatasync(fd)) < 0) {
        close(fd);
        return rc;
    }
    w->fd = fd;
    return 0;
}

int wal_open(const char *dir, const wal_options_t *opt, wal_t **out)
{
    *out = NULL;
    if (!opt || opt->segment_size < 4096 || opt->buffer_size < 4096 ||
        opt->segment_size > (1ull << 40) || opt->buffer_size > (1ull << 30))
        return WAL_EINVAL;
    if (strlen(dir) >= WAL_PATH_MAX - 64)
        return -ENAMETOOLONG;
    wal_t *w = calloc(1, sizeof *w);
    if (!w)
        return -ENOMEM;
    snprintf(w->dir, sizeof w->dir, "%s", dir);
    w->system_id = opt->system_id;
    w->segment_size = opt->segment_size;
    w->fd = -1;
    w->next_fd = -1;
    w->buf_cap = w->spare_cap = (size_t)opt->buffer_size;
    w->buf = malloc(w->buf_cap);
    w->spare = malloc(w->spare_cap);
    uint64_t *segs = NULL;
    size_t n = 0;
    int rc = (!w->buf || !w->spare) ? -ENOMEM : remove_tmp(dir);
    /* wal/END is read, and removed durably before anything is appended: it
     * must never name an end that appends have moved (docs/FORMAT.md). A hint
     * that matches stays until the first append (end_pending), so that an
     * open that writes nothing writes nothing; any other goes now. */
    end_hint_t hint;
    int hr = rc == 0 ? endhint_read(dir, &hint) : WAL_HINT_NONE;
    if (hr != WAL_HINT_NONE)
        w->end_hint = WAL_HINT_IGNORED;
    if (rc == 0)
        rc = seg_list(dir, &segs, &n);
    if (rc == 0 && n > 0) {
        /* the hint is usable only for the newest segment, which LAST confirms */
        uint64_t last = 0;
        int use = hr == WAL_HINT_USED && hint.system_id == w->system_id &&
                  hint.seg_first_lsn == segs[n - 1] && last_read(dir, &last) == 0 &&
                  last == segs[n - 1];
        rc = open_last(w, segs[n - 1], use ? &hint : NULL);
    }
    if (rc == 0 && w->end_hint == WAL_HINT_USED)
        w->end_pending = 1;
    else if (rc == 0 && hr != WAL_HINT_NONE)
        rc = endhint_remove(dir);
    if (rc == 0 && n > 0) {
        /* LAST behind the newest segment (a directory restored or made before
         * LAST existed): catch it up, so that losing that segment shows */
        uint64_t last = 0;
        int lr = last_read(dir, &last);
        if (lr == 1 || (lr == 0 && last < segs[n - 1]))
            rc = last_write(dir, segs[n - 1]);
        else if (lr < 0)
            rc = lr;
    }
    free(segs);
    uint64_t min_next = opt->min_next_lsn ? opt->min_next_lsn : 1;
    if (rc == 0 && (n == 0 || w->next_lsn < min_next)) {
        /* no log yet, or the snapshot is ahead of it: start a segment at min_next */
        /* LSNs below min_next are in the snapshot or were handed out before a
         * crash: never reissued. The segment records where the log left off. */
        uint64_t prev = n == 0 ? opt->covered_lsn : w->next_lsn - 1;
        if (prev >= min_next)
            prev = min_next - 1;
        w->next_lsn = min_next;
        if (w->end_pending && (rc = endhint_remove(dir)) == 0)
            w->end_pending = 0;
        seg_header_t h = {.first_lsn = w->next_lsn, .prev_lsn = prev,
                          .system_id = w->system_id, .segment_size = w->segment_size};
        int fd = rc == 0 ? seg_create(dir, &h, w->segment_size) : rc;
        if (fd < 0) {
            rc = fd;
        } else {
            if (w->fd >= 0)
                close(w->fd);
            w->fd = fd;
            w->hdr = h;
            w->seg_alloc = w->segment_size;
            w->file_off = w->seg_synced = WAL_SEG_HDR_SIZE;
            w->segments_created++;
            marks_reset(w, w->segment_size);
        }
    }
    if (rc < 0) {
        if (w->fd >= 0)
            close(w->fd);
        free(w->buf);
        free(w->spare);
        free(w);
        return rc;
    }
    w->written_lsn = w->durable_lsn = w->next_lsn - 1;
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&w->arrive_cv, &ca);
    pthread_condattr_destroy(&ca);
    pthread_cond_init(&w->prep_cv, NULL);
    *out = w;
    return 0;
}

int wal_close(wal_t *w)
{
    if (!w)
        return 0;
    pthread_mutex_lock(&w->mu);
    int rc = w->poisoned ? WAL_EPOISONED : 0;
    w->sync_waiters++;
    if (rc == 0)
        rc = sync_locked(w, w->next_lsn - 1);
    quiesce_locked(w);
    /* Everything is durable and nothing more will be appended: say where the
     * log ends (only if a record of this segment is known to end it). */
    if (rc == 0 && !w->poisoned && !w->end_pending && w->fd >= 0 && w->buf_len == 0 &&
        w->last_rec_off &&
        w->durable_lsn == w->next_lsn - 1 && w->next_lsn - 1 >= w->hdr.first_lsn) {
        end_hint_t h = {.system_id = w->system_id, .seg_first_lsn = w->hdr.first_lsn,
                        .salt = w->hdr.salt, .end = w->file_off, .last_lsn = w->next_lsn - 1,
                        .last_off = w->last_rec_off};
        for (uint32_t i = 0; i < w->nmarks && w->mark_lsn[i] < h.last_lsn; i++) {
            h.mark_lsn[i] = w->mark_lsn[i];
            h.mark_off[i] = w->mark_off[i];
            h.nmarks = i + 1;
        }
        (void)endhint_write(w->dir, &h); /* without it the next open scans */
    }
    pthread_mutex_unlock(&w->mu);
    prep_shutdown(w);
    if (w->fd >= 0)
        close(w->fd);
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->cv);
    pthread_cond_destroy(&w->arrive_cv);
    pthread_cond_destroy(&w->prep_cv);
    free(w->buf);
    free(w->spare);
    free(w);
    return rc;
}
