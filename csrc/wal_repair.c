/* Cutting the log at a point (a torn tail, or point-in-time recovery), never
 * without a copy: the cut bytes go to a ".broken" file first. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "wal_internal.h"

/* Writes buf to a new file at path and fsyncs it. */
static int write_copy(const char *path, const uint8_t *buf, size_t len)
{
    int fd = h_open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0)
        return fd;
    int rc = h_pwrite_all(fd, buf, len, 0);
    if (rc == 0)
        rc = h_fsync(fd);
    close(fd);
    return rc;
}

int wal_cut(const char *dir, uint64_t seg_first_lsn, uint64_t offset, uint64_t *cut_bytes)
{
    *cut_bytes = 0;
    if (strlen(dir) >= WAL_PATH_MAX - 64)
        return -ENAMETOOLONG;
    uint64_t *segs;
    size_t n;
    /* 0. wal/END gone first: it must never name an end the cut moves */
    int rc = endhint_remove(dir);
    if (rc < 0)
        return rc;
    rc = seg_list(dir, &segs, &n);
    if (rc < 0)
        return rc;
    char path[WAL_PATH_MAX + 64], broken[WAL_PATH_MAX + 128];
    uint8_t *buf = NULL;
    size_t len = 0;
    uint64_t fsize = 0, want = 0;
    seg_name(path, sizeof path, dir, seg_first_lsn);
    int whole = offset <= WAL_SEG_HDR_SIZE;
    /* 1. the cut part of the segment, copied aside and made durable */
    if (!whole) {
        rc = file_read_all(path, &buf, &len, &fsize);
        seg_header_t sh;
        if (rc == 0 && seg_decode_header(buf, len, &sh) == 0 && fsize < sh.segment_size)
            want = sh.segment_size; /* cut short by a copy: given its size back below */
        if (rc == 0 && offset < len) {
            size_t end = len;
            while (end > offset && buf[end - 1] == 0)
                end--;
            if (end > offset) {
                snprintf(broken, sizeof broken, "%s.%llu.broken", path, (unsigned long long)offset);
                rc = write_copy(broken, buf + offset, end - offset);
                if (rc == 0)
                    *cut_bytes += end - offset;
                len = end;
            } else {
                len = offset;
            }
        } else if (rc == 0) {
            len = offset;
        }
    }
    /* 2. wal/LAST lowered to the newest segment that stays, durably, before any
     *    segment goes: it must never name one that is gone */
    if (rc == 0) {
        uint64_t newest = 0;
        for (size_t i = 0; i < n; i++)
            if (segs[i] < seg_first_lsn || (segs[i] == seg_first_lsn && !whole))
                newest = segs[i];
        rc = newest ? last_write(dir, newest) : last_remove(dir);
    }
    /* 3. later segments (and a wholly cut one) renamed aside, newest first,
     *    so that a crash in between leaves a log that still ends at the cut */
    for (size_t i = n; rc == 0 && i-- > 0;) {
        if (segs[i] < seg_first_lsn || (segs[i] == seg_first_lsn && !whole))
            continue;
        struct stat st;
        seg_name(path, sizeof path, dir, segs[i]);
        snprintf(broken, sizeof broken, "%s.broken", path);
        if (stat(path, &st) == 0)
            *cut_bytes += (uint64_t)st.st_size;
        rc = h_rename(path, broken);
    }
    if (rc == 0)
        rc = dir_fsync(dir);
    /* 4. the cut bytes zeroed in place: the space stays allocated */
    if (rc == 0 && !whole && len > offset) {
        seg_name(path, sizeof path, dir, seg_first_lsn);
        int fd = h_open(path, O_WRONLY, 0);
        if (fd < 0) {
            rc = fd;
        } else {
            memset(buf + offset, 0, len - offset);
            rc = h_pwrite_all(fd, buf + offset, len - offset, offset);
            if (rc == 0)
                rc = h_fdatasync(fd);
            close(fd);
        }
    }
    /* 5. a segment cut short (by a partial copy, a truncate) that stays gets its
     *    recorded size back, zero-filled like a new one, so that it reads as a
     *    whole segment again (the writer appends into it) */
    if (rc == 0 && !whole && want > fsize) {
        int fd = h_open(path, O_WRONLY, 0);
        if (fd < 0) {
            rc = fd;
        } else {
            static const uint8_t zeros[1 << 16];
            for (uint64_t o = fsize; rc == 0 && o < want;) {
                size_t k = want - o < sizeof zeros ? (size_t)(want - o) : sizeof zeros;
                rc = h_pwrite_all(fd, zeros, k, o);
                o += k;
            }
            if (rc == 0)
                rc = h_fsync(fd); /* fsync: the size is metadata */
            close(fd);
        }
    }
    free(buf);
    free(segs);
    return rc;
}

