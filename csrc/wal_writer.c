/* Appending: records are encoded into a user-space buffer under the handle's
 * mutex. Whoever needs the bytes on disk swaps the buffer out and writes it
 * with the mutex released (one writer at a time: write_busy) while others
 * keep appending into the other buffer. A full segment is completed and
 * the next one created (rotate_locked). Durability (group commit) is
 * wal_sync.c's.
 *
 * Failure policy (PostgreSQL's fsyncgate lesson): a failed write or
 * fdatasync poisons the handle. The page cache may have dropped the dirty
 * pages, so retrying the fsync could "succeed" over lost data: nothing is
 * acknowledged any more until the log is reopened and re-read from disk.
 * The one clean failure is ENOSPC while creating a segment: the old segment
 * is complete and synced, no byte of the record was written.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

#include "wal_internal.h"

/* A new current segment of `alloc` bytes: no record known in it yet. */
void wal_marks_reset(wal_t *w, uint64_t alloc)
{
    w->mark_stride = alloc / WAL_END_MARKS;
    if (w->mark_stride < 4096)
        w->mark_stride = 4096;
    w->mark_next = WAL_SEG_HDR_SIZE + w->mark_stride;
    w->nmarks = 0;
    w->last_rec_off = 0;
}

/* Requires mu (released while waiting and during the write). Writes what is
 * buffered; afterwards everything appended before the call is written.
 * Returns 0 or the error (poisoning). */
int wal_write_locked(wal_t *w)
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
        wal_poison(w, rc);
    } else {
        w->writes++;
        w->written_lsn = target;
    }
    pthread_cond_broadcast(&w->cv);
    return rc;
}

/* Requires mu, held throughout (rotation is rare). Completes and syncs the
 * current segment -- a reader treats a segment followed by another as whole
 * -- then creates the next, large enough for a record of `need` bytes. */
static int rotate_locked(wal_t *w, uint64_t need)
{
    wal_quiesce_locked(w);
    if (w->poisoned)
        return WAL_EPOISONED;
    w->write_busy = 1;
    int rc = 0;
    if (w->buf_len)
        rc = h_pwrite_all(w->fd, w->buf, w->buf_len, w->file_off);
    if (rc == 0 && w->seg_synced < w->file_off + w->buf_len) {
        uint64_t t0 = wal_now_ns();
        rc = h_fdatasync(w->fd);
        if (rc == 0) {
            wal_note_fsync(w, wal_now_ns() - t0);
            h_sync_trace(w->hdr.first_lsn, w->file_off + w->buf_len);
        }
    }
    if (rc) {
        wal_poison(w, rc);
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
            wal_poison(w, fd);
        return fd;
    }
    close(w->fd);
    w->fd = fd;
    w->hdr = h;
    w->seg_alloc = alloc;
    w->file_off = w->seg_synced = WAL_SEG_HDR_SIZE;
    w->segments_created++;
    wal_marks_reset(w, alloc);
    h_killpoint("rotate_after_create");
    return 0;
}

/* nowait: return WAL_EAGAIN instead of waiting for the mutex or doing any I/O
 * (a caller that holds the GIL must not block). */
static int append_pieces(wal_t *w, unsigned type, const wal_piece_t *pc, int npc,
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
            if ((rc = wal_write_locked(w)) != 0)
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
    wal_prepare_next(w);
    uint8_t *r = w->buf + w->buf_len;
    uint64_t lsn = w->next_lsn++;
    wal_note_record(w, lsn, w->file_off + w->buf_len);
    rec_encode(r, w->hdr.salt, type, lsn, w->durable_lsn, pc, npc, plen);
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
    wal_piece_t pc[2] = {{a, alen}, {b, blen}};
    return append_pieces(w, type, pc, 2, lsn_out, 0);
}

/* PUT payload = u16 key length || key || value. */
static int put_record(wal_t *w, const void *key, size_t klen, const void *val, size_t vlen,
                      uint64_t *lsn_out, int nowait)
{
    if (klen == 0 || klen > 0xffff)
        return WAL_EINVAL;
    uint8_t kl[2] = {(uint8_t)klen, (uint8_t)(klen >> 8)};
    wal_piece_t pc[3] = {{kl, WAL_PUT_HDR_SIZE}, {key, klen}, {val, vlen}};
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

int wal_flush(wal_t *w)
{
    pthread_mutex_lock(&w->mu);
    int rc = wal_write_locked(w);
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

