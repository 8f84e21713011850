/* wal/END: where the log ends, written by a clean wal_close so that the next
 * open reads neither the zero tail of the newest segment nor the records
 * before the position it asks for. A hint, never trusted: it is parsed
 * defensively (untrusted bytes from disk) and checked against the segment
 * before use -- the records from the chosen start up to the hinted end must
 * form a valid chain ending with the hinted record, and the bytes after it
 * must be zeros. Anything else means a full scan, as without the file.
 *
 * Invariant (docs/FORMAT.md, "wal/END"): nothing is appended to the log
 * while END exists. wal_close publishes it only once every record is
 * durable; a writable wal_open removes it durably (unlink + directory fsync)
 * before anything on disk changes; wal_cut removes it before cutting.
 *
 *   0  magic "WALSTEND"       8  version u32 (=1)   12 nmarks u32 (<= 64)
 *   16 system_id u64          24 seg_first_lsn u64  32 salt u32 (segment header crc)
 *   36 reserved u32 (=0)      40 end u64 (byte offset where the log ends)
 *   48 last_lsn u64           56 last_off u64 (offset of the last record's header)
 *   64 nmarks x (lsn u64, offset u64)            then crc32c(all before) u32
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "wal_internal.h"

static void end_path(char *out, size_t cap, const char *dir, const char *suffix)
{
    snprintf(out, cap, "%s/%s%s", dir, WAL_END_NAME, suffix);
}

static size_t end_size(uint32_t nmarks)
{
    return WAL_END_HDR_SIZE + 16u * (size_t)nmarks + 4u;
}

/* Field checks that need no segment: 0 plausible, 1 not. */
static int hint_sane(const end_hint_t *h)
{
    if (h->seg_first_lsn == 0 || h->last_lsn < h->seg_first_lsn ||
        h->last_off < WAL_SEG_HDR_SIZE || h->end < h->last_off ||
        h->end - h->last_off < WAL_REC_HDR_SIZE ||
        h->end - h->last_off - WAL_REC_HDR_SIZE > WAL_REC_MAX_PAYLOAD || h->nmarks > WAL_END_MARKS)
        return 1;
    uint64_t plsn = h->seg_first_lsn, poff = WAL_SEG_HDR_SIZE;
    for (uint32_t i = 0; i < h->nmarks; i++) {
        /* strictly inside (first record, last record), strictly increasing */
        if (h->mark_lsn[i] <= plsn || h->mark_off[i] <= poff || h->mark_lsn[i] >= h->last_lsn ||
            h->mark_off[i] >= h->last_off)
            return 1;
        plsn = h->mark_lsn[i];
        poff = h->mark_off[i];
    }
    return 0;
}

int endhint_read(const char *dir, end_hint_t *h)
{
    char path[WAL_PATH_MAX + 64];
    uint8_t buf[WAL_END_HDR_SIZE + 16 * WAL_END_MARKS + 4 + 1];
    memset(h, 0, sizeof *h);
    end_path(path, sizeof path, dir, "");
    /* plain open/read: a hint that cannot be read is only ignored */
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno == ENOENT ? WAL_HINT_NONE : WAL_HINT_IGNORED;
    size_t got = 0;
    while (got < sizeof buf) {
        ssize_t n = read(fd, buf + got, sizeof buf - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    close(fd);
    if (got < end_size(0) || memcmp(buf, WAL_END_MAGIC, 8) != 0 ||
        get32(buf + 8) != WAL_END_VERSION || get32(buf + 12) > WAL_END_MARKS ||
        got != end_size(get32(buf + 12)) || get32(buf + 36) != 0)
        return WAL_HINT_IGNORED;
    uint32_t nm = get32(buf + 12);
    size_t body = end_size(nm) - 4;
    if (wal_crc32c(0, buf, body) != get32(buf + body))
        return WAL_HINT_IGNORED;
    h->system_id = get64(buf + 16);
    h->seg_first_lsn = get64(buf + 24);
    h->salt = get32(buf + 32);
    h->end = get64(buf + 40);
    h->last_lsn = get64(buf + 48);
    h->last_off = get64(buf + 56);
    h->nmarks = nm;
    for (uint32_t i = 0; i < nm; i++) {
        h->mark_lsn[i] = get64(buf + WAL_END_HDR_SIZE + 16 * i);
        h->mark_off[i] = get64(buf + WAL_END_HDR_SIZE + 16 * i + 8);
    }
    return hint_sane(h) ? WAL_HINT_IGNORED : WAL_HINT_USED;
}

int endhint_write(const char *dir, const end_hint_t *h)
{
    char tmp[WAL_PATH_MAX + 64], final[WAL_PATH_MAX + 64];
    uint8_t buf[WAL_END_HDR_SIZE + 16 * WAL_END_MARKS + 4];
    if (hint_sane(h))
        return WAL_EINVAL;
    memset(buf, 0, sizeof buf);
    memcpy(buf, WAL_END_MAGIC, 8);
    put32(buf + 8, WAL_END_VERSION);
    put32(buf + 12, h->nmarks);
    put64(buf + 16, h->system_id);
    put64(buf + 24, h->seg_first_lsn);
    put32(buf + 32, h->salt);
    put64(buf + 40, h->end);
    put64(buf + 48, h->last_lsn);
    put64(buf + 56, h->last_off);
    for (uint32_t i = 0; i < h->nmarks; i++) {
        put64(buf + WAL_END_HDR_SIZE + 16 * i, h->mark_lsn[i]);
        put64(buf + WAL_END_HDR_SIZE + 16 * i + 8, h->mark_off[i]);
    }
    size_t body = end_size(h->nmarks) - 4;
    put32(buf + body, wal_crc32c(0, buf, body));
    end_path(tmp, sizeof tmp, dir, ".tmp");
    end_path(final, sizeof final, dir, "");
    int fd = h_open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0)
        return fd;
    int rc = h_pwrite_all(fd, buf, body + 4, 0);
    if (rc == 0)
        rc = h_fsync(fd);
    close(fd);
    h_killpoint("end_hint_before_rename");
    if (rc == 0)
        rc = h_rename(tmp, final);
    if (rc == 0)
        rc = dir_fsync(dir);
    if (rc < 0)
        unlink(tmp); /* best effort; wal_open removes leftovers too */
    return rc;
}

int endhint_remove(const char *dir)
{
    char path[WAL_PATH_MAX + 64];
    struct stat st;
    end_path(path, sizeof path, dir, "");
    if (lstat(path, &st) < 0 && errno == ENOENT)
        return 0; /* the common case: no system call that a fault test counts */
    if (S_ISDIR(st.st_mode))
        return 0; /* not a hint (none is ever read from it) and not ours to remove */
    int rc = h_unlink(path);
    if (rc == -ENOENT)
        return 0;
    if (rc == 0)
        rc = dir_fsync(dir);
    if (rc == 0)
        h_killpoint("end_hint_after_remove");
    return rc;
}

/* Checks buf (file bytes [base, base + len)) against the hint: a chain of
 * valid records with consecutive LSNs from buf[0] (LSN start_lsn) ending with
 * the hinted record exactly at the hinted end, then zeros. 0 ok, 1 not. */
static int check_chain(const uint8_t *buf, size_t len, uint64_t base, uint64_t start_lsn,
                       uint32_t salt, const end_hint_t *h)
{
    wal_record_t rec = {0};
    size_t off = 0, end = (size_t)(h->end - base);
    uint64_t expected = start_lsn;
    while (off < end) {
        if (!rec_parse(buf, end, off, salt, &rec) || rec.lsn != expected)
            return 1;
        if (rec.lsn == h->last_lsn)
            break;
        off += WAL_REC_HDR_SIZE + rec.len;
        expected++;
    }
    if (off != h->last_off - base || rec.lsn != h->last_lsn ||
        off + WAL_REC_HDR_SIZE + rec.len != end)
        return 1;
    for (size_t i = end; i < len; i++)
        if (buf[i])
            return 1;
    return 0;
}

int endhint_load(const char *path, const end_hint_t *h, uint64_t from_lsn, seg_header_t *hdr,
                 uint8_t **buf_out, uint64_t *base_out, size_t *len_out, uint64_t *start_lsn_out,
                 uint64_t *size_out, uint64_t *bytes_read)
{
    uint8_t hb[WAL_SEG_HDR_SIZE];
    *buf_out = NULL;
    int fd;
    uint64_t size;
    int orc = file_open_sized(path, &fd, &size);
    if (orc < 0)
        return orc;
    if (h->end > size || size < WAL_SEG_HDR_SIZE) {
        close(fd);
        return 1;
    }
    int rc = h_pread_all(fd, hb, sizeof hb, 0);
    if (rc < 0) {
        close(fd);
        return rc;
    }
    *bytes_read += sizeof hb;
    if (seg_decode_header(hb, sizeof hb, hdr) != 0 || hdr->first_lsn != h->seg_first_lsn ||
        hdr->salt != h->salt) {
        close(fd);
        return 1;
    }
    /* start at the latest known record at or below from_lsn */
    uint64_t start = WAL_SEG_HDR_SIZE, start_lsn = h->seg_first_lsn;
    for (uint32_t i = 0; i < h->nmarks && h->mark_lsn[i] <= from_lsn; i++) {
        start = h->mark_off[i];
        start_lsn = h->mark_lsn[i];
    }
    if (h->last_lsn <= from_lsn) {
        start = h->last_off;
        start_lsn = h->last_lsn;
    }
    uint64_t stop = size - h->end > WAL_END_TAIL_CHECK ? h->end + WAL_END_TAIL_CHECK : size;
    size_t len = (size_t)(stop - start);
    uint8_t *buf = malloc(len ? len : 1);
    if (!buf) {
        close(fd);
        return -ENOMEM;
    }
    rc = h_pread_all(fd, buf, len, start);
    close(fd);
    if (rc < 0) {
        free(buf);
        return rc;
    }
    *bytes_read += len;
    if (check_chain(buf, len, start, start_lsn, hdr->salt, h)) {
        free(buf);
        return 1;
    }
    *buf_out = buf;
    *base_out = start;
    *len_out = len;
    *start_lsn_out = start_lsn;
    *size_out = size;
    return 0;
}
