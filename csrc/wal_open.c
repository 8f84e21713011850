/* Opening the log for appending (the newest segment, where its records end:
 * from wal/END when it matches, else by a scan), starting a segment when there
 * is none, and closing (everything made durable, then wal/END written). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "wal_internal.h"

/* Requires the last segment loaded in buf: finds where its records end,
 * noting the records it passes (marks). */
static int find_end(wal_t *w, const uint8_t *buf, size_t len, const seg_header_t *h,
                    uint64_t *next_lsn, size_t *end)
{
    wal_record_t rec;
    size_t off = WAL_SEG_HDR_SIZE;
    uint64_t expected = h->first_lsn;
    for (;;) {
        if (rec_parse(buf, len, off, h->salt, &rec) && rec.lsn == expected) {
            wal_note_record(w, rec.lsn, off);
            off += WAL_REC_HDR_SIZE + rec.len;
            expected++;
            continue;
        }
        /* damage in records the snapshot holds (recovery, which reads from the
         * snapshot's LSN on, passed over it the same way): the next valid record
         * of this segment at most one above covered_lsn goes on */
        size_t p = off + 1;
        for (; expected <= w->covered_lsn && p + WAL_REC_HDR_SIZE <= len; p++) {
            uint64_t lsn = get64(buf + p + 8);
            if (lsn > expected && lsn <= w->covered_lsn + 1 &&
                rec_parse(buf, len, p, h->salt, &rec))
                break;
        }
        if (expected > w->covered_lsn || p + WAL_REC_HDR_SIZE > len)
            break;
        off = p;
        expected = rec.lsn;
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
    wal_marks_reset(w, size);
    for (uint32_t i = 0; i < hint->nmarks; i++)
        wal_note_record(w, hint->mark_lsn[i], hint->mark_off[i]);
    wal_note_record(w, hint->last_lsn, hint->last_off);
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
            wal_marks_reset(w, size);
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
    w->covered_lsn = opt->covered_lsn;
    w->fd = -1;
    w->next_fd = -1;
    w->buf_cap = w->spare_cap = (size_t)opt->buffer_size;
    w->buf = malloc(w->buf_cap);
    w->spare = malloc(w->spare_cap);
    uint64_t *segs = NULL;
    size_t n = 0;
    int rc = (!w->buf || !w->spare) ? -ENOMEM : seg_remove_tmp(dir);
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
            wal_marks_reset(w, w->segment_size);
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
        rc = wal_sync_locked(w, w->next_lsn - 1);
    wal_quiesce_locked(w);
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
    wal_prep_shutdown(w);
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
