/* crashsim: an LD_PRELOAD library that records, into a trace file, every call
 * that changes files under one directory tree, so that walstate.testing.crashsim can
 * rebuild the disk states a power loss could leave (walstate/testing/crashsim.py reads
 * the trace; docs/RELIABILITY.md says how it is used).
 *
 * Environment (read once, at load):
 *   CRASHSIM_ROOT   absolute, symlink-free directory whose files are traced
 *   CRASHSIM_TRACE  trace file to append to (outside CRASHSIM_ROOT)
 *   CRASHSIM_MARK   a file whose writes are recorded as MARK events (the
 *                   workload's "attempted"/"acknowledged" notes), not as data
 *
 * Every event is logged after the real call succeeded and before the wrapper
 * returns, under one mutex: anything that causally follows a call (a sync
 * after a write, an acknowledgement after a sync) comes later in the trace.
 * close() is logged before the real close, so a reused descriptor number can
 * never be logged before the close of its previous holder.
 *
 * Record: u32 type, u32 fd, u32 flags, u32 path_len, u32 path2_len, u32 pad,
 * u64 offset, u64 length, then path, path2, and `length` data bytes for
 * writes and marks. Failed calls are not logged (they changed nothing we
 * model; a short write logs what landed).
 *
 * Not for production: compiled by the test harness with gcc -shared -fPIC. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

enum {
    EV_OPEN = 1, EV_CLOSE, EV_WRITE, EV_FSYNC, EV_FDATASYNC, EV_MSYNC, EV_RENAME, EV_UNLINK,
    EV_RMDIR, EV_TRUNCATE, EV_FTRUNCATE, EV_FALLOCATE, EV_MKDIR, EV_MARK, EV_SYNCALL
};

struct rec {
    uint32_t type, fd, flags, path_len, path2_len, pad;
    uint64_t offset, length;
};

#define MAXFD 65536
static char *fd_path[MAXFD];   /* traced descriptors: their path at open */
static unsigned char fd_mark[MAXFD];
static char root[PATH_MAX];
static size_t root_len;
static char mark_path[PATH_MAX];
static int trace_fd = -1;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;

/* Writes all of buf to the trace with the raw syscall (never through our
 * own wrappers). Requires mu held. */
static void raw_write(const void *buf, size_t len)
{
    const char *p = buf;
    while (len > 0) {
        long n = syscall(SYS_write, trace_fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            abort(); /* a lost trace would make every later verdict wrong */
        p += n;
        len -= (size_t)n;
    }
}

/* Logs one event; data is described by iov (may be NULL) limited to `len`. */
static void emit(uint32_t type, int fd, uint32_t flags, const char *path, const char *path2,
                 uint64_t off, const struct iovec *iov, int iovcnt, uint64_t len)
{
    struct rec r = {type, (uint32_t)fd, flags, path ? (uint32_t)strlen(path) : 0,
                    path2 ? (uint32_t)strlen(path2) : 0, 0, off, len};
    int saved = errno;
    pthread_mutex_lock(&mu);
    raw_write(&r, sizeof r);
    if (r.path_len)
        raw_write(path, r.path_len);
    if (r.path2_len)
        raw_write(path2, r.path2_len);
    uint64_t left = iov ? len : 0;
    for (int i = 0; i < iovcnt && left > 0; i++) {
        size_t n = iov[i].iov_len < left ? iov[i].iov_len : (size_t)left;
        raw_write(iov[i].iov_base, n);
        left -= n;
    }
    pthread_mutex_unlock(&mu);
    errno = saved;
}

__attribute__((constructor)) static void crashsim_init(void)
{
    const char *r = getenv("CRASHSIM_ROOT"), *t = getenv("CRASHSIM_TRACE");
    const char *m = getenv("CRASHSIM_MARK");
    if (!r || !t || !*r || !*t)
        return;
    snprintf(root, sizeof root, "%s", r);
    root_len = strlen(root);
    while (root_len > 1 && root[root_len - 1] == '/')
        root[--root_len] = 0;
    if (m)
        snprintf(mark_path, sizeof mark_path, "%s", m);
    trace_fd = (int)syscall(SYS_openat, AT_FDCWD, t, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC,
                            0644);
}

#define REAL(name) \
    static __typeof__(name) *real_##name; \
    if (!real_##name) real_##name = (__typeof__(name) *)dlsym(RTLD_NEXT, #name)

/* The absolute, lexically normalised form of `path` relative to dirfd, in out. */
static int absolute(int dirfd, const char *path, char *out)
{
    char base[PATH_MAX], tmp[2 * PATH_MAX + 2];
    if (!path)
        return -1;
    if (path[0] == '/') {
        snprintf(tmp, sizeof tmp, "%s", path);
    } else {
        if (dirfd == AT_FDCWD) {
            if (!getcwd(base, sizeof base))
                return -1;
        } else {
            char link[64];
            snprintf(link, sizeof link, "/proc/self/fd/%d", dirfd);
            ssize_t n = readlink(link, base, sizeof base - 1);
            if (n < 0)
                return -1;
            base[n] = 0;
        }
        snprintf(tmp, sizeof tmp, "%s/%s", base, path);
    }
    /* normalise: drop "." and "//", resolve ".." lexically */
    size_t o = 0;
    const char *p = tmp;
    while (*p) {
        while (*p == '/')
            p++;
        if (!*p)
            break;
        const char *e = strchr(p, '/');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        if (len == 1 && p[0] == '.') {
        } else if (len == 2 && p[0] == '.' && p[1] == '.') {
            while (o > 0 && out[o - 1] != '/')
                o--;
            if (o > 0)
                o--;
        } else {
            if (o + len + 2 >= PATH_MAX)
                return -1;
            out[o++] = '/';
            memcpy(out + o, p, len);
            o += len;
        }
        p += len;
    }
    if (o == 0)
        out[o++] = '/';
    out[o] = 0;
    return 0;
}

static int under_root(const char *abs)
{
    return trace_fd >= 0 && strncmp(abs, root, root_len) == 0 &&
           (abs[root_len] == 0 || abs[root_len] == '/');
}

static int traced_fd(int fd)
{
    return trace_fd >= 0 && fd >= 0 && fd < MAXFD && (fd_path[fd] || fd_mark[fd]);
}

static void after_open(int fd, int dirfd, const char *path, int flags)
{
    char abs[PATH_MAX];
    if (fd < 0 || fd >= MAXFD || trace_fd < 0 || absolute(dirfd, path, abs) < 0)
        return;
    if (mark_path[0] && strcmp(abs, mark_path) == 0) {
        fd_mark[fd] = 1;
        return;
    }
    if (!under_root(abs))
        return;
    char *copy = strdup(abs);
    pthread_mutex_lock(&mu);
    free(fd_path[fd]);
    fd_path[fd] = copy;
    pthread_mutex_unlock(&mu);
    emit(EV_OPEN, fd, (uint32_t)flags, abs, NULL, 0, NULL, 0, 0);
}

static int mode_arg(int flags, va_list ap)
{
    return (flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE ? va_arg(ap, int) : 0;
}

int open(const char *path, int flags, ...)
{
    REAL(open);
    va_list ap;
    va_start(ap, flags);
    int mode = mode_arg(flags, ap);
    va_end(ap);
    int fd = real_open(path, flags, mode);
    after_open(fd, AT_FDCWD, path, flags);
    return fd;
}

int open64(const char *path, int flags, ...)
{
    REAL(open64);
    va_list ap;
    va_start(ap, flags);
    int mode = mode_arg(flags, ap);
    va_end(ap);
    int fd = real_open64(path, flags, mode);
    after_open(fd, AT_FDCWD, path, flags);
    return fd;
}

int openat(int dirfd, const char *path, int flags, ...)
{
    REAL(openat);
    va_list ap;
    va_start(ap, flags);
    int mode = mode_arg(flags, ap);
    va_end(ap);
    int fd = real_openat(dirfd, path, flags, mode);
    after_open(fd, dirfd, path, flags);
    return fd;
}

int openat64(int dirfd, const char *path, int flags, ...)
{
    REAL(openat64);
    va_list ap;
    va_start(ap, flags);
    int mode = mode_arg(flags, ap);
    va_end(ap);
    int fd = real_openat64(dirfd, path, flags, mode);
    after_open(fd, dirfd, path, flags);
    return fd;
}

int __open_2(const char *path, int flags)
{
    return open(path, flags);
}

int __open64_2(const char *path, int flags)
{
    return open64(path, flags);
}

int creat(const char *path, mode_t mode)
{
    return open(path, O_CREAT | O_WRONLY | O_TRUNC, mode);
}

int creat64(const char *path, mode_t mode)
{
    return open64(path, O_CREAT | O_WRONLY | O_TRUNC, mode);
}

int close(int fd)
{
    REAL(close);
    if (traced_fd(fd)) {
        if (fd_path[fd])
            emit(EV_CLOSE, fd, 0, NULL, NULL, 0, NULL, 0, 0);
        pthread_mutex_lock(&mu);
        free(fd_path[fd]);
        fd_path[fd] = NULL;
        fd_mark[fd] = 0;
        pthread_mutex_unlock(&mu);
    }
    return real_close(fd);
}

static void log_write(int fd, uint64_t off, const struct iovec *iov, int iovcnt, ssize_t n)
{
    if (n <= 0)
        return;
    if (fd_mark[fd])
        emit(EV_MARK, fd, 0, NULL, NULL, 0, iov, iovcnt, (uint64_t)n);
    else
        emit(EV_WRITE, fd, 0, NULL, NULL, off, iov, iovcnt, (uint64_t)n);
}

/* The offset a write() at the current position landed at, after it. */
static uint64_t landed_at(int fd, ssize_t n)
{
    off_t end = lseek(fd, 0, SEEK_CUR);
    return end < 0 || n < 0 ? 0 : (uint64_t)(end - n);
}

ssize_t write(int fd, const void *buf, size_t count)
{
    REAL(write);
    ssize_t n = real_write(fd, buf, count);
    if (n > 0 && traced_fd(fd)) {
        struct iovec v = {(void *)buf, (size_t)n};
        log_write(fd, landed_at(fd, n), &v, 1, n);
    }
    return n;
}

ssize_t writev(int fd, const struct iovec *iov, int iovcnt)
{
    REAL(writev);
    ssize_t n = real_writev(fd, iov, iovcnt);
    if (n > 0 && traced_fd(fd))
        log_write(fd, landed_at(fd, n), iov, iovcnt, n);
    return n;
}

ssize_t pwrite(int fd, const void *buf, size_t count, off_t off)
{
    REAL(pwrite);
    ssize_t n = real_pwrite(fd, buf, count, off);
    if (n > 0 && traced_fd(fd)) {
        struct iovec v = {(void *)buf, (size_t)n};
        log_write(fd, (uint64_t)off, &v, 1, n);
    }
    return n;
}

ssize_t pwrite64(int fd, const void *buf, size_t count, off_t off)
{
    REAL(pwrite64);
    ssize_t n = real_pwrite64(fd, buf, count, off);
    if (n > 0 && traced_fd(fd)) {
        struct iovec v = {(void *)buf, (size_t)n};
        log_write(fd, (uint64_t)off, &v, 1, n);
    }
    return n;
}

ssize_t pwritev(int fd, const struct iovec *iov, int iovcnt, off_t off)
{
    REAL(pwritev);
    ssize_t n = real_pwritev(fd, iov, iovcnt, off);
    if (n > 0 && traced_fd(fd))
        log_write(fd, (uint64_t)off, iov, iovcnt, n);
    return n;
}

ssize_t pwritev64(int fd, const struct iovec *iov, int iovcnt, off_t off)
{
    REAL(pwritev64);
    ssize_t n = real_pwritev64(fd, iov, iovcnt, off);
    if (n > 0 && traced_fd(fd))
        log_write(fd, (uint64_t)off, iov, iovcnt, n);
    return n;
}

ssize_t pwritev2(int fd, const struct iovec *iov, int iovcnt, off_t off, int flags)
{
    REAL(pwritev2);
    ssize_t n = real_pwritev2(fd, iov, iovcnt, off, flags);
    if (n > 0 && traced_fd(fd)) {
        /* RWF_DSYNC/RWF_SYNC make this one write durable: log a sync after it */
        log_write(fd, off == -1 ? landed_at(fd, n) : (uint64_t)off, iov, iovcnt, n);
        if (flags & (RWF_DSYNC | RWF_SYNC))
            emit(EV_FDATASYNC, fd, 0, NULL, NULL, 0, NULL, 0, 0);
    }
    return n;
}

int fsync(int fd)
{
    REAL(fsync);
    int rc = real_fsync(fd);
    if (rc == 0 && traced_fd(fd) && fd_path[fd])
        emit(EV_FSYNC, fd, 0, NULL, NULL, 0, NULL, 0, 0);
    return rc;
}

int fdatasync(int fd)
{
    REAL(fdatasync);
    int rc = real_fdatasync(fd);
    if (rc == 0 && traced_fd(fd) && fd_path[fd])
        emit(EV_FDATASYNC, fd, 0, NULL, NULL, 0, NULL, 0, 0);
    return rc;
}

int msync(void *addr, size_t len, int flags)
{
    REAL(msync);
    int rc = real_msync(addr, len, flags);
    /* walstate never maps a file writable (no MDB_WRITEMAP): an msync here is
     * logged so that the harness can refuse a trace it cannot model */
    if (rc == 0 && trace_fd >= 0 && (flags & MS_SYNC))
        emit(EV_MSYNC, -1, (uint32_t)flags, NULL, NULL, (uint64_t)(uintptr_t)addr, NULL, 0, len);
    return rc;
}

void sync(void)
{
    REAL(sync);
    real_sync();
    if (trace_fd >= 0)
        emit(EV_SYNCALL, -1, 0, NULL, NULL, 0, NULL, 0, 0);
}

int syncfs(int fd)
{
    REAL(syncfs);
    int rc = real_syncfs(fd);
    if (rc == 0 && trace_fd >= 0)
        emit(EV_SYNCALL, fd, 0, NULL, NULL, 0, NULL, 0, 0);
    return rc;
}

static int two_paths(int fd1, const char *p1, int fd2, const char *p2, char *a1, char *a2)
{
    if (trace_fd < 0 || absolute(fd1, p1, a1) < 0 || absolute(fd2, p2, a2) < 0)
        return 0;
    return under_root(a1) || under_root(a2);
}

int renameat2(int ofd, const char *from, int nfd, const char *to, unsigned int flags)
{
    REAL(renameat2);
    char a1[PATH_MAX], a2[PATH_MAX];
    int t = two_paths(ofd, from, nfd, to, a1, a2);
    int rc = real_renameat2(ofd, from, nfd, to, flags);
    if (rc == 0 && t)
        emit(EV_RENAME, -1, flags, a1, a2, 0, NULL, 0, 0);
    return rc;
}

int renameat(int ofd, const char *from, int nfd, const char *to)
{
    REAL(renameat);
    char a1[PATH_MAX], a2[PATH_MAX];
    int t = two_paths(ofd, from, nfd, to, a1, a2);
    int rc = real_renameat(ofd, from, nfd, to);
    if (rc == 0 && t)
        emit(EV_RENAME, -1, 0, a1, a2, 0, NULL, 0, 0);
    return rc;
}

int rename(const char *from, const char *to)
{
    REAL(rename);
    char a1[PATH_MAX], a2[PATH_MAX];
    int t = two_paths(AT_FDCWD, from, AT_FDCWD, to, a1, a2);
    int rc = real_rename(from, to);
    if (rc == 0 && t)
        emit(EV_RENAME, -1, 0, a1, a2, 0, NULL, 0, 0);
    return rc;
}

static void one_path(uint32_t type, int dirfd, const char *path, uint64_t off, uint32_t flags)
{
    char a[PATH_MAX];
    if (trace_fd >= 0 && absolute(dirfd, path, a) == 0 && under_root(a))
        emit(type, -1, flags, a, NULL, off, NULL, 0, 0);
}

int unlink(const char *path)
{
    REAL(unlink);
    int rc = real_unlink(path);
    if (rc == 0)
        one_path(EV_UNLINK, AT_FDCWD, path, 0, 0);
    return rc;
}

int unlinkat(int dirfd, const char *path, int flags)
{
    REAL(unlinkat);
    int rc = real_unlinkat(dirfd, path, flags);
    if (rc == 0)
        one_path(flags & AT_REMOVEDIR ? EV_RMDIR : EV_UNLINK, dirfd, path, 0, 0);
    return rc;
}

int rmdir(const char *path)
{
    REAL(rmdir);
    int rc = real_rmdir(path);
    if (rc == 0)
        one_path(EV_RMDIR, AT_FDCWD, path, 0, 0);
    return rc;
}

int mkdir(const char *path, mode_t mode)
{
    REAL(mkdir);
    int rc = real_mkdir(path, mode);
    if (rc == 0)
        one_path(EV_MKDIR, AT_FDCWD, path, 0, 0);
    return rc;
}

int mkdirat(int dirfd, const char *path, mode_t mode)
{
    REAL(mkdirat);
    int rc = real_mkdirat(dirfd, path, mode);
    if (rc == 0)
        one_path(EV_MKDIR, dirfd, path, 0, 0);
    return rc;
}

int truncate(const char *path, off_t len)
{
    REAL(truncate);
    int rc = real_truncate(path, len);
    if (rc == 0)
        one_path(EV_TRUNCATE, AT_FDCWD, path, (uint64_t)len, 0);
    return rc;
}

int truncate64(const char *path, off_t len)
{
    return truncate(path, len);
}

int ftruncate(int fd, off_t len)
{
    REAL(ftruncate);
    int rc = real_ftruncate(fd, len);
    if (rc == 0 && traced_fd(fd) && fd_path[fd])
        emit(EV_FTRUNCATE, fd, 0, NULL, NULL, (uint64_t)len, NULL, 0, 0);
    return rc;
}

int ftruncate64(int fd, off_t len)
{
    return ftruncate(fd, len);
}

int fallocate(int fd, int mode, off_t off, off_t len)
{
    REAL(fallocate);
    int rc = real_fallocate(fd, mode, off, len);
    if (rc == 0 && traced_fd(fd) && fd_path[fd])
        emit(EV_FALLOCATE, fd, (uint32_t)mode, NULL, NULL, (uint64_t)off, NULL, 0,
             (uint64_t)len);
    return rc;
}

int fallocate64(int fd, int mode, off_t off, off_t len)
{
    return fallocate(fd, mode, off, len);
}

int posix_fallocate(int fd, off_t off, off_t len)
{
    REAL(posix_fallocate);
    int rc = real_posix_fallocate(fd, off, len);
    if (rc == 0 && traced_fd(fd) && fd_path[fd])
        emit(EV_FALLOCATE, fd, 0, NULL, NULL, (uint64_t)off, NULL, 0, (uint64_t)len);
    return rc;
}

int posix_fallocate64(int fd, off_t off, off_t len)
{
    return posix_fallocate(fd, off, len);
}
