/* Scanning and validating the log. Every byte read from disk is untrusted:
 * lengths are checked against the buffer before use, and how the log ends
 * is decided in one place, classify_stop():
 *
 *   - the rest of the segment is zeros: the segment ends here; if it is the
 *     last one the log ends cleanly, else reading goes on in the next
 *     segment, whose first LSN must continue the sequence;
 *   - otherwise, in the last segment, bytes that do not parse are a torn
 *     tail -- unless a valid record further on says (by its synced_lsn) that
 *     the record expected here had already been made durable: that is
 *     corruption. A non-last segment was fdatasynced whole before the next
 *     one was created, so garbage in it is always corruption.
 *
 * With WAL_READ_END_HINT and a wal/END that matches the newest segment
 * (wal_endhint.c checks it), that segment is read only from the latest
 * record known at or below from_lsn to just past the hinted end: the bytes
 * after the end were checked to be zeros, so classify_stop() sees a clean end
 * there without reading the zero tail. Offsets in buf are then relative to
 * `base` (the file offset of buf[0]).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>

#include "wal_internal.h"

struct wal_reader {
    char dir[WAL_PATH_MAX];
    uint64_t system_id, from_lsn;
    uint64_t *segs;
    size_t nsegs, idx;
    uint8_t *buf;
    size_t len, off;
    uint64_t base;   /* file offset of buf[0] */
    int loaded;
    int use_hint;    /* hint holds a wal/END that names the newest segment */
    int copy;        /* WAL_READ_COPY: the newest segment may be cut at its records' end */
    end_hint_t hint;
    uint64_t hint_start_lsn; /* LSN of buf[0] in the hinted segment */
    seg_header_t hdr;
    uint64_t expected; /* LSN of the next record; 0 before the first segment */
    uint64_t file_size; /* of the current segment; below hdr.segment_size: cut short */
    int last_bad;       /* wal/LAST names a segment that is gone (1) or is garbage (2):
                         * reported where the segments on disk end */
    uint64_t last_lsn;  /* last_bad == 1: the segment LAST names */
    wal_end_t end;
};

static void stop(wal_reader_t *r, int status, int rc, size_t off)
{
    r->end.status = status;
    r->end.rc = rc;
    r->end.offset = r->base + off;
    r->end.expected_lsn = r->expected;
    if (r->idx < r->nsegs) {
        r->end.seg_first_lsn = r->segs[r->idx];
        r->end.later_segments = r->nsegs - r->idx - 1;
        seg_name(r->end.path, sizeof r->end.path, r->dir, r->segs[r->idx]);
    }
}

/* Index of the last non-zero byte in buf[from..len) plus one, or `from` if none. */
static size_t nonzero_end(const uint8_t *buf, size_t from, size_t len)
{
    size_t i = len;
    while (i > from && buf[i - 1] == 0)
        i--;
    return i;
}

/* 1 if a valid record after `from` proves that LSN `expected` was durable. */
static int durable_record_after(const wal_reader_t *r, size_t from)
{
    wal_record_t rec;
    for (size_t p = from + 1; p + WAL_REC_HDR_SIZE <= r->len; p++) {
        const uint8_t *h = r->buf + p;
        /* cheap filters before the crc: a plausible LSN that knows `expected` durable */
        uint64_t synced = get64(h + 16), lsn = get64(h + 8);
        if (synced < r->expected || lsn <= synced || h[24] == 0)
            continue;
        if (rec_parse(r->buf, r->len, p, r->hdr.salt, &rec))
            return 1;
    }
    return 0;
}

/* Reading stopped at r->off in the current segment: decide why. 1: go on with
 * the next segment; 0: the log ended (r->end filled). */
static int classify_stop(wal_reader_t *r)
{
    size_t nz = nonzero_end(r->buf, r->off, r->len);
    int last = r->idx + 1 >= r->nsegs;
    /* Segments are preallocated to the size their header records (a larger one
     * holds one oversized record) before they get their name, so no crash
     * leaves the newest one shorter: a copy or a truncate cut it, and records
     * may be missing with nothing else to say so. (An earlier segment cut short
     * shows in the next one's prev_lsn.) */
    if (last && r->file_size < r->hdr.segment_size && !r->copy) {
        stop(r, WAL_END_ERROR, WAL_ESHORT, r->off);
        return 0;
    }
    if (nz == r->off) {
        if (!last)
            return 1;
        stop(r, WAL_END_CLEAN, 0, r->off);
        return 0;
    }
    if (!last || durable_record_after(r, r->off)) {
        stop(r, WAL_END_ERROR, WAL_ECORRUPT, r->off);
        return 0;
    }
    stop(r, WAL_END_TORN, 0, r->off);
    r->end.cut_bytes = nz - r->off;
    return 0;
}

/* The hinted segment, read from the latest known record at or below from_lsn
 * (endhint_load): 0 loaded, 1 the hint does not match, < 0 an I/O error. */
static int load_hinted(wal_reader_t *r, const char *path)
{
    uint8_t *buf;
    uint64_t base, start_lsn, size;
    size_t len;
    int rc = endhint_load(path, &r->hint, r->from_lsn, &r->hdr, &buf, &base, &len, &start_lsn,
                          &size, &r->end.bytes_read);
    r->use_hint = 0; /* one try: the hinted segment is the last one */
    if (rc != 0) {
        r->end.end_hint = WAL_HINT_IGNORED;
        return rc;
    }
    r->end.end_hint = WAL_HINT_USED;
    r->file_size = size;
    r->buf = buf;
    r->len = len;
    r->base = base;
    r->hint_start_lsn = start_lsn;
    return 0;
}

static int load_segment(wal_reader_t *r)
{
    char path[WAL_PATH_MAX + 64];
    free(r->buf);
    r->buf = NULL;
    r->base = 0;
    seg_name(path, sizeof path, r->dir, r->segs[r->idx]);
    int hinted = 0, rc = 1;
    if (r->use_hint && r->segs[r->idx] == r->hint.seg_first_lsn) {
        rc = load_hinted(r, path);
        if (rc < 0) {
            stop(r, WAL_END_ERROR, rc, 0);
            return rc;
        }
        hinted = rc == 0;
    }
    if (!hinted) {
        rc = file_read_all(path, &r->buf, &r->len, &r->file_size);
        if (rc < 0) {
            stop(r, WAL_END_ERROR, rc, 0);
            return rc;
        }
        r->end.bytes_read += r->len;
        rc = seg_decode_header(r->buf, r->len, &r->hdr);
        if (rc < 0) {
            stop(r, WAL_END_ERROR, rc, 0);
            return rc;
        }
    }
    if (r->system_id && r->hdr.system_id != r->system_id) {
        stop(r, WAL_END_ERROR, WAL_EMISMATCH, 0);
        r->end.found_system_id = r->hdr.system_id;
        return WAL_EMISMATCH;
    }
    /* a header that disagrees with its name, or a segment that does not
     * continue the previous one (a missing or foreign segment). LSNs may jump
     * forward at a segment boundary (after a crash the writer skips the LSNs
     * a lost buffer may have handed out); prev_lsn says where it continues. */
    if (r->hdr.first_lsn != r->segs[r->idx] ||
        (r->expected && r->hdr.prev_lsn != r->expected - 1)) {
        stop(r, WAL_END_ERROR, WAL_ECORRUPT, 0);
        return WAL_ECORRUPT;
    }
    /* The first segment read may start above from_lsn only if the LSNs between
     * were never handed out (an LSN skip after a crash): its prev_lsn then lies
     * below from_lsn. Otherwise records are missing: a gap. */
    if (!r->expected && r->from_lsn && r->hdr.first_lsn > r->from_lsn &&
        r->hdr.prev_lsn >= r->from_lsn) {
        r->expected = r->from_lsn;
        stop(r, WAL_END_ERROR, WAL_EGAP, 0);
        return WAL_EGAP;
    }
    if (hinted) {
        r->expected = r->hint_start_lsn;
        r->off = 0;
    } else {
        r->expected = r->hdr.first_lsn;
        r->off = WAL_SEG_HDR_SIZE;
    }
    r->loaded = 1;
    r->end.segments++;
    return 0;
}

/* Reading stopped at r->off, below from_lsn (in records that the snapshot
 * already holds): damage there does not matter to a reader that starts at
 * from_lsn. Finds the next valid record of this segment with an LSN above the
 * expected one and at most from_lsn -- the segment salt in its CRC says that
 * it was written into this very file -- and goes on from it. 1 found, 0 not
 * (the stop is then judged as any other). */
static int resync_below(wal_reader_t *r)
{
    wal_record_t rec;
    for (size_t p = r->off + 1; p + WAL_REC_HDR_SIZE <= r->len; p++) {
        uint64_t lsn = get64(r->buf + p + 8);
        if (lsn <= r->expected || lsn > r->from_lsn)
            continue;
        if (rec_parse(r->buf, r->len, p, r->hdr.salt, &rec)) {
            r->off = p;
            r->expected = lsn;
            return 1;
        }
    }
    return 0;
}

/* Moves past the valid record `rec` that starts at r->off. */
static void accept(wal_reader_t *r, wal_record_t *rec)
{
    r->off += WAL_REC_HDR_SIZE + rec->len;
    r->end.last_lsn = rec->lsn;
    r->end.bytes += WAL_REC_HDR_SIZE + rec->len;
    r->expected++;
    rec->seg_first_lsn = r->hdr.first_lsn;
}

int wal_reader_open(const char *dir, uint64_t system_id, uint64_t from_lsn, wal_reader_t **out)
{
    return wal_reader_open_flags(dir, system_id, from_lsn, 0, out);
}

int wal_reader_open_flags(const char *dir, uint64_t system_id, uint64_t from_lsn, unsigned flags,
                          wal_reader_t **out)
{
    *out = NULL;
    if (strlen(dir) >= WAL_PATH_MAX - 64)
        return -ENAMETOOLONG;
    wal_reader_t *r = calloc(1, sizeof *r);
    if (!r)
        return -ENOMEM;
    snprintf(r->dir, sizeof r->dir, "%s", dir);
    r->system_id = system_id;
    r->from_lsn = from_lsn;
    r->copy = (flags & WAL_READ_COPY) != 0;
    /* LAST before the listing: a writer publishes LAST only once the segment
     * it names has its name (renamed, directory fsynced), and the newest
     * segment is never removed, so every segment LAST named when it was read
     * is in a listing made after. Listing first, a segment switch in between
     * would make the new LAST name a segment the listing lacks: "the newest
     * segment is lost", wrongly. A listing newer than LAST is fine (LAST is
     * a lower bound). */
    uint64_t last = 0;
    int lr = last_read(dir, &last);
    if (lr < 0 && lr != WAL_ECORRUPT) {
        free(r);
        return lr;
    }
    h_callpoint("reader_open");
    int rc = seg_list(dir, &r->segs, &r->nsegs);
    if (rc < 0) {
        free(r);
        return rc;
    }
    if (r->nsegs > 0 && (lr == WAL_ECORRUPT || (lr == 0 && last > r->segs[r->nsegs - 1]))) {
        /* the newest segment ever created is gone (or LAST is unreadable): the
         * segments on disk are read, and the log is reported to end in that
         * error where they end (point-in-time recovery keeps what they hold) */
        r->last_bad = lr == 0 ? 1 : 2;
        r->last_lsn = last;
    }
    if (r->nsegs == 0 && (lr == WAL_ECORRUPT || lr == 0)) {
        /* the newest segment ever created is gone (or LAST is unreadable) */
        r->idx = r->nsegs;
        r->expected = lr == 0 ? last : 0;
        stop(r, WAL_END_ERROR, WAL_ECORRUPT, 0);
        if (lr == 0)
            seg_name(r->end.path, sizeof r->end.path, dir, last);
        else
            snprintf(r->end.path, sizeof r->end.path, "%s/%s", dir, WAL_LAST_NAME);
    } else if (r->nsegs == 0) {
        stop(r, WAL_END_CLEAN, 0, 0);
    } else {
        if ((flags & WAL_READ_END_HINT) && !r->last_bad) {
            /* usable only if it names the newest segment, which LAST confirms */
            int hr = endhint_read(dir, &r->hint);
            if (hr == WAL_HINT_USED &&
                (system_id == 0 || r->hint.system_id == system_id) && lr == 0 &&
                last == r->segs[r->nsegs - 1] && r->hint.seg_first_lsn == last)
                r->use_hint = 1;
            else if (hr != WAL_HINT_NONE)
                r->end.end_hint = WAL_HINT_IGNORED;
        }
        /* start at the last segment that begins at or below from_lsn */
        size_t i = 0;
        while (i + 1 < r->nsegs && r->segs[i + 1] <= from_lsn)
            i++;
        r->idx = i; /* a first segment above from_lsn is checked in load_segment */
    }
    *out = r;
    return 0;
}

int wal_reader_next(wal_reader_t *r, wal_record_t *rec)
{
    for (;;) {
        if (r->end.status != WAL_END_NONE)
            return r->end.status == WAL_END_ERROR ? r->end.rc : 0;
        if (!r->loaded) {
            int rc = load_segment(r);
            if (rc < 0)
                return rc;
        }
        int ok = rec_parse(r->buf, r->len, r->off, r->hdr.salt, rec);
        if ((!ok || rec->lsn != r->expected) && r->expected < r->from_lsn && resync_below(r))
            continue;
        if (ok) {
            if (rec->lsn != r->expected) {
                stop(r, WAL_END_ERROR, WAL_ECORRUPT, r->off);
                return WAL_ECORRUPT;
            }
            accept(r, rec);
            rec->offset += r->base;
            if (rec->lsn < r->from_lsn)
                continue;
            return 1;
        }
        if (!classify_stop(r)) {
            if (r->last_bad && r->end.status != WAL_END_ERROR) {
                /* clean or torn: the log goes on in a segment that is gone */
                r->end.status = WAL_END_ERROR;
                r->end.rc = WAL_ECORRUPT;
                if (r->last_bad == 1)
                    seg_name(r->end.path, sizeof r->end.path, r->dir, r->last_lsn);
                else if (snprintf(r->end.path, sizeof r->end.path, "%s/%s", r->dir,
                                  WAL_LAST_NAME) >= (int)sizeof r->end.path)
                    r->end.path[0] = 0; /* cannot happen: dir is checked at open */
            }
            return r->end.status == WAL_END_ERROR ? r->end.rc : 0;
        }
        r->idx++;
        r->loaded = 0;
    }
}

int wal_reader_batch(wal_reader_t *r, size_t max, uint64_t *lsn, uint8_t *type, uint64_t *off,
                     uint64_t *len, const uint8_t **base)
{
    wal_record_t rec;
    size_t n = 0;
    *base = NULL;
    if (max == 0)
        return 0;
    int rc = wal_reader_next(r, &rec); /* the first may load a segment */
    if (rc <= 0)
        return rc;
    for (;;) {
        lsn[n] = rec.lsn;
        type[n] = rec.type;
        off[n] = (uint64_t)(rec.payload - r->buf);
        len[n] = rec.len;
        n++;
        /* the rest only from the same segment buffer; anything else (its end,
         * an invalid record) is left to the next wal_reader_next call */
        if (n == max || !rec_parse(r->buf, r->len, r->off, r->hdr.salt, &rec) ||
            rec.lsn != r->expected)
            break;
        accept(r, &rec);
    }
    *base = r->buf;
    return (int)n;
}

void wal_reader_end(wal_reader_t *r, wal_end_t *end)
{
    *end = r->end;
    if (end->status == WAL_END_NONE)
        end->expected_lsn = r->expected;
}

void wal_reader_close(wal_reader_t *r)
{
    if (!r)
        return;
    free(r->buf);
    free(r->segs);
    free(r);
}
