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
 * recovery relies on to be repeatable). Any violation aborts.
 *
 * From the first "WALSTEND" on, the input is the wal/END file instead (with a
 * LAST naming the newest segment, so that the hint can pass its checks): the
 * log is read once more using the hint (WAL_READ_END_HINT). Its bytes are as
 * untrusted as the segments'; when the hint is used and both reads end clean,
 * they must have returned the same records. */
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
static uint64_t read_all_flags(wal_end_t *end, uint64_t *lsn_sum, unsigned flags)
{
    wal_reader_t *r = NULL;
    uint64_t n = 0;
    *lsn_sum = 0;
    memset(end, 0, sizeof *end);
    if (wal_reader_open_flags(dir, 0, 0, flags, &r) != 0)
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

static uint64_t read_all(wal_end_t *end, uint64_t *lsn_sum)
{
    return read_all_flags(end, lsn_sum, 0);
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
    static const char magic[8] = "WALSTSEG", end_magic[8] = "WALSTEND";
    clear_dir();
    size_t start = 0, end_at = size;
    int files = 0;
    for (size_t i = 0; i + 8 <= size; i++)
        if (memcmp(data + i, end_magic, 8) == 0) {
            end_at = i;
            break;
        }
    uint64_t newest = 0;
    const uint8_t *end_file = data + end_at;
    size_t end_len = size - end_at;
    size = end_at;
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
        if (first_lsn > newest)
            newest = first_lsn;
        files++;
        start = next;
    }
    wal_end_t end, end2;
    uint64_t sum, sum2;
    uint64_t n = read_all(&end, &sum);
    if (end_len) {
        char last[32];
        int ll = snprintf(last, sizeof last, "%016llx\n", (unsigned long long)newest);
        put_file("LAST", (const uint8_t *)last, (size_t)ll);
        put_file("END", end_file, end_len);
        wal_end_t endh;
        uint64_t sumh;
        uint64_t nh = read_all_flags(&endh, &sumh, WAL_READ_END_HINT);
        if (endh.end_hint == WAL_HINT_USED && endh.status == WAL_END_CLEAN &&
            end.status == WAL_END_CLEAN && (nh != n || sumh != sum)) {
            fprintf(stderr, "the hint changed a clean read: %llu records, %llu without it\n",
                    (unsigned long long)nh, (unsigned long long)n);
            abort();
        }
        char p[512];
        snprintf(p, sizeof p, "%s/END", dir);
        unlink(p); /* the tail cut below must not meet a hint */
    }
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
