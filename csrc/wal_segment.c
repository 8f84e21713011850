/* Segment files: naming, the header, atomic creation with preallocation (and
 * the spare made ahead), wal/LAST, listing, removal of old segments and of
 * crash leftovers, directory fsync, reading a segment file. The one place
 * that knows the layout of the WAL directory. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "wal_internal.h"

void seg_name(char *out, size_t cap, const char *dir, uint64_t first_lsn)
{
    snprintf(out, cap, "%s/%016llx%s", dir, (unsigned long long)first_lsn, WAL_SEG_SUFFIX);
}

int seg_parse_name(const char *name, uint64_t *first_lsn)
{
    uint64_t v = 0;
    for (int i = 0; i < 16; i++) {
        char c = name[i];
        int d;
        if (c >= '0' && c <= '9')
            d = c - '0';
        else if (c >= 'a' && c <= 'f')
            d = c - 'a' + 10;
        else
            return 0;
        v = v << 4 | (uint64_t)d;
    }
    if (strcmp(name + 16, WAL_SEG_SUFFIX) != 0)
        return 0;
    *first_lsn = v;
    return 1;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

int seg_list(const char *dir, uint64_t **out, size_t *n)
{
    *out = NULL;
    *n = 0;
    DIR *d = opendir(dir);
    if (!d)
        return -errno;
    size_t cap = 0, cnt = 0;
    uint64_t *v = NULL;
    struct dirent *e;
    errno = 0;
    while ((e = readdir(d)) != NULL) {
        uint64_t lsn;
        if (!seg_parse_name(e->d_name, &lsn))
            continue;
        if (cnt == cap) {
            size_t ncap = cap ? cap * 2 : 16;
            uint64_t *nv = realloc(v, ncap * sizeof *v);
            if (!nv) {
                free(v);
                closedir(d);
                return -ENOMEM;
            }
            v = nv;
            cap = ncap;
        }
        v[cnt++] = lsn;
    }
    int err = errno;
    closedir(d);
    if (err) {
        free(v);
        return -err;
    }
    if (cnt)
        qsort(v, cnt, sizeof *v, cmp_u64);
    *out = v;
    *n = cnt;
    return 0;
}

int dir_fsync(const char *dir)
{
    int fd = h_open(dir, O_RDONLY | O_DIRECTORY, 0);
    if (fd < 0)
        return fd;
    int rc = h_fsync(fd);
    close(fd);
    return rc;
}

void seg_encode_header(uint8_t *buf, seg_header_t *h)
{
    memset(buf, 0, WAL_SEG_HDR_SIZE);
    memcpy(buf, WAL_SEG_MAGIC, WAL_SEG_MAGIC_LEN);
    put32(buf + 8, WAL_FORMAT_VERSION);
    put32(buf + 12, WAL_SEG_HDR_SIZE);
    put64(buf + 16, h->system_id);
    put64(buf + 24, h->first_lsn);
    put64(buf + 32, h->nonce);
    put64(buf + 40, h->segment_size);
    put64(buf + 48, h->prev_lsn);
    h->salt = wal_crc32c(0, buf, WAL_SEG_HDR_CRC_OFF);
    put32(buf + WAL_SEG_HDR_CRC_OFF, h->salt);
}

int seg_decode_header(const uint8_t *buf, size_t len, seg_header_t *h)
{
    if (len < WAL_SEG_HDR_SIZE || memcmp(buf, WAL_SEG_MAGIC, WAL_SEG_MAGIC_LEN) != 0)
        return WAL_ECORRUPT;
    uint32_t crc = wal_crc32c(0, buf, WAL_SEG_HDR_CRC_OFF);
    if (crc != get32(buf + WAL_SEG_HDR_CRC_OFF))
        return WAL_ECORRUPT;
    /* the version is checked after the crc so that garbage is not "a newer version" */
    if (get32(buf + 8) != WAL_FORMAT_VERSION)
        return WAL_EVERSION;
    if (get32(buf + 12) != WAL_SEG_HDR_SIZE)
        return WAL_ECORRUPT;
    h->system_id = get64(buf + 16);
    h->first_lsn = get64(buf + 24);
    h->nonce = get64(buf + 32);
    h->segment_size = get64(buf + 40);
    h->prev_lsn = get64(buf + 48);
    h->salt = crc;
    if (h->first_lsn == 0 || h->prev_lsn >= h->first_lsn)
        return WAL_ECORRUPT;
    return 0;
}

static uint64_t random_nonce(void)
{
    uint64_t v = 0;
    int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        if (read(fd, &v, sizeof v) != (ssize_t)sizeof v)
            v = 0;
        close(fd);
    }
    if (v == 0) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        v = (uint64_t)ts.tv_nsec * 0x9e3779b97f4a7c15ull ^ (uint64_t)ts.tv_sec ^ (uint64_t)getpid();
    }
    return v;
}

/* ---- wal/LAST: the first LSN of the newest segment ever created ----------
 * A lower bound, published by rename after each new segment: if the newest
 * segment file is lost (deleted, a bad restore), no segment on disk can say
 * so -- LAST does, and the reader reports the missing segment. */

static void last_path(char *out, size_t cap, const char *dir, const char *suffix)
{
    snprintf(out, cap, "%s/%s%s", dir, WAL_LAST_NAME, suffix);
}

/* Writes and fsyncs LAST.tmp holding `lsn`; last_publish renames it. */
static int last_prepare(const char *dir, uint64_t lsn)
{
    char path[WAL_PATH_MAX + 64], line[32];
    last_path(path, sizeof path, dir, ".tmp");
    int n = snprintf(line, sizeof line, "%016llx\n", (unsigned long long)lsn);
    int fd = h_open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0)
        return fd;
    int rc = h_pwrite_all(fd, line, (size_t)n, 0);
    if (rc == 0)
        rc = h_fsync(fd);
    close(fd);
    return rc;
}

static int last_publish(const char *dir)
{
    char from[WAL_PATH_MAX + 64], to[WAL_PATH_MAX + 64];
    last_path(from, sizeof from, dir, ".tmp");
    last_path(to, sizeof to, dir, "");
    return h_rename(from, to);
}

int last_write(const char *dir, uint64_t lsn)
{
    int rc = last_prepare(dir, lsn);
    if (rc == 0)
        rc = last_publish(dir);
    if (rc == 0)
        rc = dir_fsync(dir);
    return rc;
}

int last_remove(const char *dir)
{
    char path[WAL_PATH_MAX + 64];
    last_path(path, sizeof path, dir, "");
    int rc = h_unlink(path);
    if (rc == -ENOENT)
        return 0;
    return rc == 0 ? dir_fsync(dir) : rc;
}

int last_read(const char *dir, uint64_t *lsn)
{
    char path[WAL_PATH_MAX + 64], line[32] = {0};
    last_path(path, sizeof path, dir, "");
    int fd = h_open(path, O_RDONLY, 0);
    if (fd == -ENOENT)
        return 1;
    if (fd < 0)
        return fd;
    ssize_t n = read(fd, line, sizeof line - 1);
    close(fd);
    if (n != 17 || line[16] != '\n')
        return WAL_ECORRUPT;
    char name[WAL_SEG_NAME_LEN + 1];
    memcpy(name, line, 16);
    memcpy(name + 16, WAL_SEG_SUFFIX, sizeof WAL_SEG_SUFFIX); /* with its NUL */
    return seg_parse_name(name, lsn) ? 0 : WAL_ECORRUPT;
}

/* Writes zeros over [0, size). fallocate alone leaves "unwritten" extents, and
 * every later fdatasync must then also commit their conversion to written --
 * metadata whose failure some kernels only log ("failed to convert unwritten
 * extents ... potential data loss"), while fdatasync reports success: an
 * acknowledged record lost on a failing disk (seen with ext4 on a failing loop
 * device). Overwriting written blocks needs no metadata, so fdatasync's answer
 * covers the record. PostgreSQL zero-fills its WAL segments for the same reason. */
static int zero_fill(int fd, uint64_t size)
{
    static const uint8_t zeros[1 << 16];
    for (uint64_t off = 0; off < size;) {
        size_t n = size - off < sizeof zeros ? (size_t)(size - off) : sizeof zeros;
        int rc = h_pwrite_all(fd, zeros, n, off);
        if (rc < 0)
            return rc;
        off += n;
    }
    return 0;
}

int seg_spare_make(const char *dir, uint64_t size, char *path, size_t cap)
{
    snprintf(path, cap, "%s/spare-%016llx.tmp", dir, (unsigned long long)random_nonce());
    int fd = h_open(path, O_RDWR | O_CREAT | O_EXCL, 0644);
    if (fd < 0)
        return fd;
    int rc = h_fallocate(fd, size);
    if (rc == 0)
        rc = zero_fill(fd, size);
    if (rc == 0)
        rc = h_fsync(fd); /* the blocks and the size durable before it is named */
    if (rc < 0) {
        close(fd);
        unlink(path);
        return rc;
    }
    return fd;
}

/* The steps of seg_create after the file exists, allocated and zero-filled
 * (at `tmp`, open as fd): header, fsync, LAST prepared, rename, LAST. */
static int seg_publish(const char *dir, seg_header_t *h, int fd, const char *tmp,
                       const char *final)
{
    uint8_t hdr[WAL_SEG_HDR_SIZE];
    h->nonce = random_nonce();
    seg_encode_header(hdr, h);
    int rc = h_pwrite_all(fd, hdr, sizeof hdr, 0);
    if (rc == 0)
        rc = h_fsync(fd); /* fsync, not fdatasync: the size is metadata */
    if (rc == 0)
        rc = last_prepare(dir, h->first_lsn);
    h_killpoint("segment_create_before_rename");
    if (rc == 0)
        rc = h_rename(tmp, final);
    /* the segment's name durable before LAST names it: two renames in one
     * directory may otherwise reach the disk in either order */
    if (rc == 0)
        rc = dir_fsync(dir);
    if (rc == 0)
        rc = last_publish(dir);
    if (rc == 0)
        rc = dir_fsync(dir);
    if (rc < 0) {
        close(fd);
        unlink(tmp); /* best effort; wal_open removes leftovers too */
        return rc;
    }
    h_killpoint("segment_create_after_rename");
    return fd;
}

int seg_create(const char *dir, seg_header_t *h, uint64_t alloc_size)
{
    char final[WAL_PATH_MAX + 64], tmp[WAL_PATH_MAX + 80];
    seg_name(final, sizeof final, dir, h->first_lsn);
    snprintf(tmp, sizeof tmp, "%s.tmp", final);
    /* A segment gets its final name only once its header is durable: a
     * crash during creation leaves a *.tmp that wal_open removes, never a
     * segment with a torn header. */
    int fd = h_open(tmp, O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 0)
        return fd;
    int rc = h_fallocate(fd, alloc_size); /* a full disk fails here, cleanly */
    if (rc == 0)
        rc = zero_fill(fd, alloc_size);
    if (rc < 0) {
        close(fd);
        unlink(tmp);
        return rc;
    }
    return seg_publish(dir, h, fd, tmp, final);
}

int seg_create_from_spare(const char *dir, seg_header_t *h, int spare_fd, const char *path)
{
    char final[WAL_PATH_MAX + 64];
    seg_name(final, sizeof final, dir, h->first_lsn);
    return seg_publish(dir, h, spare_fd, path, final);
}

/* Where the data of fd ends: the start of the hole that runs to EOF (preallocated,
 * never-written space reads as zeros and is reported as a hole by most file
 * systems), or the file size where SEEK_DATA/SEEK_HOLE say nothing useful. */
static uint64_t data_end(int fd, uint64_t size)
{
    uint64_t end = 0;
    off_t pos = 0;
    while ((uint64_t)pos < size) {
        off_t d = lseek(fd, pos, SEEK_DATA);
        if (d < 0)
            return errno == ENXIO ? end : size;
        off_t h = lseek(fd, d, SEEK_HOLE);
        if (h < 0 || h <= d)
            return size;
        end = (uint64_t)h;
        pos = h;
    }
    return end < size ? end : size;
}

int file_open_sized(const char *path, int *fd, uint64_t *size)
{
    *fd = h_open(path, O_RDONLY, 0);
    if (*fd < 0)
        return *fd;
    struct stat st;
    if (fstat(*fd, &st) < 0) {
        int e = -errno;
        close(*fd);
        *fd = -1;
        return e;
    }
    *size = (uint64_t)st.st_size;
    return 0;
}

int file_read_all(const char *path, uint8_t **buf, size_t *len, uint64_t *size_out)
{
    *buf = NULL;
    *len = 0;
    int fd;
    uint64_t size;
    int orc = file_open_sized(path, &fd, &size);
    if (orc < 0)
        return orc;
    if (size_out)
        *size_out = size;
    /* bytes past the data are zeros: not read (a 16 MiB segment is mostly that) */
    size_t n = (size_t)data_end(fd, size);
    uint8_t *b = malloc(n ? n : 1);
    if (!b) {
        close(fd);
        return -ENOMEM;
    }
    int rc = n ? h_pread_all(fd, b, n, 0) : 0;
    close(fd);
    if (rc < 0) {
        free(b);
        return rc;
    }
    *buf = b;
    *len = n;
    return 0;
}

/* Removes *.tmp left by a crash during segment creation. */
int seg_remove_tmp(const char *dir)
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
