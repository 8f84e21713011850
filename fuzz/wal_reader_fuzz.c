/* libFuzzer target for the WAL reader (csrc/wal_reader.c) and the tail cut
 * (csrc/wal_repair.c), built with ASan + UBSan by fuzz/build.sh.
 *
 * Input: raw segment bytes. Each occurrence of the magic "WALSTSEG" at offset
 * 0 or later starts a new segment file, named after the first_lsn field of its
 * header (bytes 24..32) as the reader requires, so that one input can hold a
 * multi-segment log. The reader runs over the directory with system_id 0
 * (any) and from_lsn 0; every record it returns must lie inside its segment.
 * When the log ends torn, the cut the recovery would make is applied and the
 * log re-read: it must then end clean with the same records (the property
 * recovery relies on to be repeatable). Any violation aborts. */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "wal.h"

static char dir[256];

static void clear_dir(void)
{
    DIR *d = opendir(dir);
    if (!d)
        return;
    struct dirent *e;
    char p[512];
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
        unlink(p);
    }
    closedir(d);
}

static void put_file(const char *name, const uint8_t *data, size_t len)
{
    char p[512];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    int fd = open(p, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0)
        abort();
    while (len > 0) {
        ssize_t n = write(fd, data, len);
        if (n <= 0)
            abort();
        data += n;
        len -= (size_t)n;
    }
    close(fd);
}

/* Reads the whole log; returns the record count, fills *end. */
static uint64_t read_all(wal_end_t *end, uint64_t *lsn_sum)
{
    wal_reader_t *r = NULL;
    uint64_t n = 0;
    *lsn_sum = 0;
    memset(end, 0, sizeof *end);
    if (wal_reader_open(dir, 0, 0, &r) != 0)
        return 0;
    wal_record_t rec;
    int rc;
    while ((rc = wal_reader_next(r, &rec)) == 1) {
        if (rec.len && !rec.payload)
            abort();
        /* touch every payload byte: ASan checks it is inside the buffer */
        volatile uint8_t x = 0;
        for (uint32_t i = 0; i < rec.len; i++)
            x ^= rec.payload[i];
        (void)x;
        n++;
        *lsn_sum += rec.lsn;
    }
    wal_reader_end(r, end);
    wal_reader_close(r);
    return n;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    const char *base = getenv("WAL_FUZZ_DIR");
    snprintf(dir, sizeof dir, "%s/walfuzz.%d", base ? base : "/dev/shm", (int)getpid());
    mkdir(dir, 0755);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const char magic[8] = "WALSTSEG";
    clear_dir();
    size_t start = 0;
    int files = 0;
    while (start < size && files < 8) {
        size_t next = size;
        for (size_t i = start + 8; i + 8 <= size; i++)
            if (memcmp(data + i, magic, 8) == 0) {
                next = i;
                break;
            }
        uint64_t first_lsn = 0;
        if (next - start >= 32)
            memcpy(&first_lsn, data + start + 24, 8);
        char name[64];
        snprintf(name, sizeof name, "%016llx.seg", (unsigned long long)first_lsn);
        put_file(name, data + start, next - start);
        files++;
        start = next;
    }
    wal_end_t end, end2;
    uint64_t sum, sum2;
    uint64_t n = read_all(&end, &sum);
    if (end.status == WAL_END_TORN) {
        uint64_t cut = 0;
        if (wal_cut(dir, end.seg_first_lsn, end.offset, &cut) == 0) {
            uint64_t n2 = read_all(&end2, &sum2);
            if (end2.status != WAL_END_CLEAN || n2 != n || sum2 != sum) {
                fprintf(stderr, "after the cut: status %d, %llu records (was %llu)\n",
                        end2.status, (unsigned long long)n2, (unsigned long long)n);
                abort();
            }
        }
    }
    return 0;
}
