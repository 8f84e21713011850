/* System calls as the WAL makes them, through test hooks that stay inert
 * (one relaxed load) unless a test enables them: injected errors on the nth
 * call, named kill points, named call points, and a trace of durable segment
 * prefixes. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <unistd.h>

#include "wal_internal.h"

static int hooks_on; /* any hook enabled: take the slow path */
static pthread_mutex_t hook_mu = PTHREAD_MUTEX_INITIALIZER;

static struct {
    uint64_t nth, calls;
    int err, persistent, fired;
} faults[WAL_OP_COUNT];

static char kill_name[128];
static uint64_t kill_nth, kill_seen;
static int trace_fd = -1;
static _Thread_local int untracked; /* this thread's calls take no injected fault */
static char call_name[128];
static void (*call_fn)(void);

static void refresh_on(void)
{
    int on = kill_name[0] != 0 || trace_fd >= 0 || call_fn != NULL;
    for (int i = 0; i < WAL_OP_COUNT; i++)
        on |= faults[i].nth != 0;
    __atomic_store_n(&hooks_on, on, __ATOMIC_RELEASE);
}

int h_faults_armed(void)
{
    if (!__atomic_load_n(&hooks_on, __ATOMIC_ACQUIRE))
        return 0;
    pthread_mutex_lock(&hook_mu);
    int on = 0;
    for (int i = 0; i < WAL_OP_COUNT; i++)
        on |= faults[i].nth != 0;
    pthread_mutex_unlock(&hook_mu);
    return on;
}

void wal_test_fault(int op, uint64_t nth, int err, int persistent)
{
    if (op < 0 || op >= WAL_OP_COUNT)
        return;
    pthread_mutex_lock(&hook_mu);
    faults[op].nth = nth;
    faults[op].calls = 0;
    faults[op].err = err;
    faults[op].persistent = persistent;
    faults[op].fired = 0;
    refresh_on();
    pthread_mutex_unlock(&hook_mu);
}

uint64_t wal_test_calls(int op)
{
    if (op < 0 || op >= WAL_OP_COUNT)
        return 0;
    pthread_mutex_lock(&hook_mu);
    uint64_t c = faults[op].calls;
    pthread_mutex_unlock(&hook_mu);
    return c;
}

void wal_test_killpoint(const char *name, uint64_t nth)
{
    pthread_mutex_lock(&hook_mu);
    snprintf(kill_name, sizeof kill_name, "%s", name ? name : "");
    kill_nth = nth ? nth : 1;
    kill_seen = 0;
    refresh_on();
    pthread_mutex_unlock(&hook_mu);
}

void wal_test_callpoint(const char *name, void (*fn)(void))
{
    pthread_mutex_lock(&hook_mu);
    snprintf(call_name, sizeof call_name, "%s", name ? name : "");
    call_fn = call_name[0] ? fn : NULL;
    refresh_on();
    pthread_mutex_unlock(&hook_mu);
}

void h_callpoint(const char *name)
{
    if (!__atomic_load_n(&hooks_on, __ATOMIC_ACQUIRE))
        return;
    pthread_mutex_lock(&hook_mu);
    void (*fn)(void) = call_fn && strcmp(call_name, name) == 0 ? call_fn : NULL;
    pthread_mutex_unlock(&hook_mu);
    if (fn)
        fn();
}

int wal_test_sync_trace(const char *path)
{
    int rc = 0;
    pthread_mutex_lock(&hook_mu);
    if (trace_fd >= 0)
        close(trace_fd);
    trace_fd = -1;
    if (path && *path) {
        trace_fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
        if (trace_fd < 0)
            rc = -errno;
    }
    refresh_on();
    pthread_mutex_unlock(&hook_mu);
    return rc;
}

void h_untracked_thread(void)
{
    untracked = 1;
}

/* 0: proceed; >0: short write; <0: the injected error. */
static int fault(int op)
{
    if (!__atomic_load_n(&hooks_on, __ATOMIC_ACQUIRE) || untracked)
        return 0;
    int rc = 0;
    pthread_mutex_lock(&hook_mu);
    if (faults[op].nth) {
        faults[op].calls++;
        if (faults[op].calls >= faults[op].nth && (faults[op].persistent || !faults[op].fired)) {
            faults[op].fired = 1;
            rc = faults[op].err ? -faults[op].err : 1;
        }
    }
    pthread_mutex_unlock(&hook_mu);
    return rc;
}

void h_killpoint(const char *name)
{
    if (!__atomic_load_n(&hooks_on, __ATOMIC_ACQUIRE))
        return;
    pthread_mutex_lock(&hook_mu);
    int hit = kill_name[0] && strcmp(kill_name, name) == 0 && ++kill_seen >= kill_nth;
    pthread_mutex_unlock(&hook_mu);
    if (hit)
        raise(SIGKILL);
}

void h_sync_trace(uint64_t seg_first_lsn, uint64_t offset)
{
    if (!__atomic_load_n(&hooks_on, __ATOMIC_ACQUIRE))
        return;
    pthread_mutex_lock(&hook_mu);
    if (trace_fd >= 0) {
        char line[64];
        int n = snprintf(line, sizeof line, "%016llx%s %llu\n", (unsigned long long)seg_first_lsn,
                         WAL_SEG_SUFFIX, (unsigned long long)offset);
        if (n > 0 && write(trace_fd, line, (size_t)n) < 0) {
            /* a trace is best effort; the test notices a missing line */
        }
    }
    pthread_mutex_unlock(&hook_mu);
}

int h_open(const char *path, int flags, int mode)
{
    int f = fault(WAL_OP_OPEN);
    if (f < 0)
        return f;
    int fd = open(path, flags | O_CLOEXEC, mode);
    return fd < 0 ? -errno : fd;
}

int h_pwrite_all(int fd, const void *buf, size_t len, uint64_t off)
{
    const uint8_t *p = buf;
    int f = fault(WAL_OP_WRITE);
    if (f < 0)
        return f;
    if (f > 0 && len > 1) {
        /* injected short write: half lands, then the device "fails" */
        ssize_t n = pwrite(fd, p, len / 2, (off_t)off);
        (void)n;
        return -EIO;
    }
    while (len > 0) {
        ssize_t n = pwrite(fd, p, len, (off_t)off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return -EIO;
        p += n;
        len -= (size_t)n;
        off += (uint64_t)n;
    }
    return 0;
}

int h_pread_all(int fd, void *buf, size_t len, uint64_t off)
{
    uint8_t *p = buf;
    size_t got = 0;
    int f = fault(WAL_OP_READ);
    if (f < 0)
        return f;
    while (got < len) {
        ssize_t n = pread(fd, p + got, len - got, (off_t)(off + got));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            break;
        got += (size_t)n;
    }
    return (int)(got == len ? 0 : -EIO);
}

/* A failed fsync is a lost write-back, whatever its errno: the file system
 * granted the space when the bytes were written (segments are fallocated and
 * zero-filled), so ENOSPC here comes from the device below (a thin volume, a
 * loop device on a full file system) and the pages may already be gone. Reported as EIO, so that no caller takes
 * it for a clean full disk. */
static int sync_errno(void)
{
    return errno == ENOSPC || errno == EDQUOT ? -EIO : -errno;
}

int h_fdatasync(int fd)
{
    int f = fault(WAL_OP_FDATASYNC);
    if (f < 0)
        return f;
    return fdatasync(fd) < 0 ? sync_errno() : 0;
}

int h_fsync(int fd)
{
    int f = fault(WAL_OP_FDATASYNC);
    if (f < 0)
        return f;
    return fsync(fd) < 0 ? sync_errno() : 0;
}

int h_fallocate(int fd, uint64_t len)
{
    int f = fault(WAL_OP_FALLOCATE);
    if (f < 0)
        return f;
    if (fallocate(fd, 0, 0, (off_t)len) == 0)
        return 0;
    if (errno != EOPNOTSUPP && errno != ENOSYS)
        return -errno;
    return 0; /* no fallocate here: seg_create's zero fill allocates every block anyway */
}

int h_rename(const char *from, const char *to)
{
    int f = fault(WAL_OP_RENAME);
    if (f < 0)
        return f;
    return rename(from, to) < 0 ? -errno : 0;
}

int h_unlink(const char *path)
{
    int f = fault(WAL_OP_UNLINK);
    if (f < 0)
        return f;
    return unlink(path) < 0 ? -errno : 0;
}
