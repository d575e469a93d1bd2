/*
 * shim.c -- LD_PRELOAD fault injection for the engine's tests
 * (built by tests/faultkit.py with the system C compiler; never shipped).
 *
 * Wraps the file syscalls (and pread/preadv, for read errors of damaged sectors) the log and its journals make and, while armed,
 * counts them and fails one chosen call -- SQLite's "ioerr" tests, done
 * from outside against the real compiled code.  The compiled modules call
 * libc through the PLT, so the dynamic linker routes them here.
 *
 * Environment (read at load):
 *   QE_FI_PREFIX  only calls on paths under this prefix count (fd-based
 *                 calls: the fd's /proc/self/fd link; msync: always counts)
 *   QE_FI_FUNC    the function whose calls are numbered for the fault
 *                 ("all": every counted call in one sequence)
 *   QE_FI_NTH     fail the NTH numbered call (1-based; 0 or unset: none)
 *   QE_FI_ERR     EIO | ENOSPC | EFBIG | EINTR | SHORT (SHORT: pwrite/write
 *                 write half the bytes and return that count)
 *   QE_FI_STICKY  1: every numbered call from the NTH on fails (a device gone)
 *   QE_FI_OUT     file the counts and the faults are written to when the
 *                 process disarms or exits: "count NAME N", "fault NAME K ERR"
 *   QE_FI_TRACE   file each numbered sync call on a path under the prefix
 *                 appends a line to as it returns successfully:
 *                 "fsync PATH", "fdatasync PATH" (the whole file) or
 *                 "msync PATH OFF LEN" (the file range the mapping maps there),
 *                 so a test can check what became durable, and when
 * Counting starts only once the workload calls qe_fi_arm(1) (ctypes), so the
 * interpreter's own start-up and imports are not numbered.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <unistd.h>

enum { F_PWRITE, F_WRITE, F_FDATASYNC, F_FSYNC, F_MSYNC, F_FALLOCATE, F_FTRUNCATE,
       F_RENAME, F_OPEN, F_MMAP, F_PREAD, F_SYNC_FILE_RANGE, F_N };
static const char *names[F_N] = {"pwrite", "write", "fdatasync", "fsync", "msync",
                                 "fallocate", "ftruncate", "rename", "open", "mmap", "pread",
                                 "sync_file_range"};

static int armed;               /* qe_fi_arm(1) ran and qe_fi_arm(0) did not */
static int inited;
static int target = -2;         /* index in names, -1 = all, -2 = none */
static long nth;                /* the call to fail */
static int err_kind;            /* errno, or -1 for SHORT */
static int sticky;
static const char *prefix;
static size_t prefix_len;
static const char *out_path;
static long counts[F_N];
static long total;
static long nfaults;            /* faults injected so far */
static char faults[4096];       /* "fault ..." lines, appended */
static size_t faults_len;
static const char *trace_path;
static int trace_fd = -1;

static void init(void) {
    if (inited) return;
    inited = 1;
    const char *f = getenv("QE_FI_FUNC");
    const char *n = getenv("QE_FI_NTH");
    const char *e = getenv("QE_FI_ERR");
    const char *s = getenv("QE_FI_STICKY");
    prefix = getenv("QE_FI_PREFIX");
    prefix_len = prefix ? strlen(prefix) : 0;
    out_path = getenv("QE_FI_OUT");
    trace_path = getenv("QE_FI_TRACE");
    nth = n ? atol(n) : 0;
    sticky = s && s[0] == '1';
    err_kind = EIO;
    if (e) {
        if (!strcmp(e, "ENOSPC")) err_kind = ENOSPC;
        else if (!strcmp(e, "EFBIG")) err_kind = EFBIG;
        else if (!strcmp(e, "EINTR")) err_kind = EINTR;
        else if (!strcmp(e, "SHORT")) err_kind = -1;
    }
    if (f && nth > 0) {
        if (!strcmp(f, "all")) target = -1;
        for (int i = 0; i < F_N; i++)
            if (!strcmp(f, names[i])) target = i;
    }
}

static void dump(void) {
    if (!out_path) return;
    int (*ropen)(const char *, int, ...) = dlsym(RTLD_NEXT, "open");
    ssize_t (*rwrite)(int, const void *, size_t) = dlsym(RTLD_NEXT, "write");
    int fd = ropen(out_path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0) return;
    char line[128];
    for (int i = 0; i < F_N; i++) {
        int k = snprintf(line, sizeof line, "count %s %ld\n", names[i], counts[i]);
        rwrite(fd, line, (size_t)k);
    }
    int k = snprintf(line, sizeof line, "count all %ld\n", total);
    rwrite(fd, line, (size_t)k);
    rwrite(fd, faults, faults_len);
    close(fd);
}

/* Called by the workload (ctypes) around the part to number. */
void qe_fi_arm(int on) {
    init();
    armed = on;
    if (!on) dump();
}

/* Faults injected so far: a workload checks whether one fired inside a call. */
long qe_fi_nfaults(void) { return __atomic_load_n(&nfaults, __ATOMIC_SEQ_CST); }

__attribute__((destructor)) static void at_exit_dump(void) {
    if (armed) dump();
}

static int path_counts(const char *path) {
    if (!prefix_len) return 1;
    return path && !strncmp(path, prefix, prefix_len);
}

static int fd_counts(int fd) {
    if (!prefix_len) return 1;
    char link[64], target_path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, target_path, sizeof target_path - 1);
    if (n <= 0) return 0;
    target_path[n] = 0;
    return !strncmp(target_path, prefix, prefix_len);
}

/* 0: let the call through; else the errno to fail with (-1: short write) */
static int decide(int f, int counted) {
    init();
    if (!armed || !counted) return 0;
    long c = __atomic_add_fetch(&counts[f], 1, __ATOMIC_SEQ_CST);
    long t = __atomic_add_fetch(&total, 1, __ATOMIC_SEQ_CST);
    long k = target == -1 ? t : (target == f ? c : -1);
    if (k < 0 || !(k == nth || (sticky && k > nth))) return 0;
    if (err_kind == -1 && f != F_PWRITE && f != F_WRITE) return 0;
    __atomic_add_fetch(&nfaults, 1, __ATOMIC_SEQ_CST);
    if (faults_len < sizeof faults - 128) {
        const char *en = err_kind == -1 ? "SHORT" : err_kind == EIO ? "EIO" :
                         err_kind == ENOSPC ? "ENOSPC" : err_kind == EFBIG ? "EFBIG" : "EINTR";
        faults_len += (size_t)snprintf(faults + faults_len, sizeof faults - faults_len,
                                       "fault %s %ld %s\n", names[f], k, en);
    }
    return err_kind;
}

/* ---- the sync trace (QE_FI_TRACE) ---- */

static void trace_line(const char *line, size_t n) {
    if (!trace_path) return;
    if (trace_fd < 0) {
        int (*ropen)(const char *, int, ...) = dlsym(RTLD_NEXT, "open");
        trace_fd = ropen(trace_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
        if (trace_fd < 0) return;
    }
    ssize_t (*rwrite)(int, const void *, size_t) = dlsym(RTLD_NEXT, "write");
    (void)rwrite(trace_fd, line, n);
}

/* "NAME PATH" for a whole-file sync of fd, when the fd's file is under the prefix */
static void trace_fd_sync(const char *name, int fd) {
    if (!trace_path || !armed) return;
    char link[64], path[4096], line[4200];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n <= 0) return;
    path[n] = 0;
    if (!path_counts(path)) return;
    int k = snprintf(line, sizeof line, "%s %s\n", name, path);
    if (k > 0 && (size_t)k < sizeof line) trace_line(line, (size_t)k);
}

/* "msync PATH OFF LEN": the file range of [addr, addr+len), from the mapping
 * that holds addr in /proc/self/maps, when its file is under the prefix */
static void trace_msync_locked(void *addr, size_t len);
static void trace_msync(void *addr, size_t len) {
    static int busy;   /* one thread at a time uses the maps buffer */
    if (!trace_path || !armed) return;
    while (__atomic_exchange_n(&busy, 1, __ATOMIC_ACQUIRE)) {}
    trace_msync_locked(addr, len);
    __atomic_store_n(&busy, 0, __ATOMIC_RELEASE);
}
static void trace_msync_locked(void *addr, size_t len) {
    static char maps[1 << 17];
    int (*ropen)(const char *, int, ...) = dlsym(RTLD_NEXT, "open");
    ssize_t (*rread)(int, void *, size_t) = dlsym(RTLD_NEXT, "read");
    int fd = ropen("/proc/self/maps", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return;
    size_t got = 0;
    for (;;) {
        ssize_t r = rread(fd, maps + got, sizeof maps - 1 - got);
        if (r <= 0) break;
        got += (size_t)r;
    }
    close(fd);
    maps[got] = 0;
    unsigned long a = (unsigned long)addr;
    for (char *line = maps; line && *line; ) {
        char *eol = strchr(line, '\n');
        if (eol) *eol = 0;
        unsigned long lo, hi, off;
        int pathpos = 0;
        if (sscanf(line, "%lx-%lx %*s %lx %*s %*s %n", &lo, &hi, &off, &pathpos) == 3
                && pathpos > 0 && lo <= a && a < hi) {
            const char *path = line + pathpos;
            if (path_counts(path)) {
                char out[4200];
                int k = snprintf(out, sizeof out, "msync %s %lu %zu\n", path, off + (a - lo), len);
                if (k > 0 && (size_t)k < sizeof out) trace_line(out, (size_t)k);
            }
            return;
        }
        line = eol ? eol + 1 : NULL;
    }
}

#define REAL(ret, name, ...) \
    static ret (*real)(__VA_ARGS__); \
    if (!real) real = (ret (*)(__VA_ARGS__))dlsym(RTLD_NEXT, name)

static ssize_t do_pwrite(const char *sym, int fd, const void *buf, size_t n, off_t off) {
    REAL(ssize_t, sym, int, const void *, size_t, off_t);
    int e = decide(F_PWRITE, fd_counts(fd));
    if (e == -1 && n > 1) return real(fd, buf, n / 2, off);
    if (e > 0) { errno = e; return -1; }
    return real(fd, buf, n, off);
}
ssize_t pwrite(int fd, const void *buf, size_t n, off_t off) { return do_pwrite("pwrite", fd, buf, n, off); }
ssize_t pwrite64(int fd, const void *buf, size_t n, off_t off) { return do_pwrite("pwrite64", fd, buf, n, off); }

ssize_t write(int fd, const void *buf, size_t n) {
    REAL(ssize_t, "write", int, const void *, size_t);
    int e = fd > 2 ? decide(F_WRITE, fd_counts(fd)) : 0;
    if (e == -1 && n > 1) return real(fd, buf, n / 2);
    if (e > 0) { errno = e; return -1; }
    return real(fd, buf, n);
}

int fdatasync(int fd) {
    REAL(int, "fdatasync", int);
    int e = decide(F_FDATASYNC, fd_counts(fd));
    if (e > 0) { errno = e; return -1; }
    int rc = real(fd);
    if (rc == 0) trace_fd_sync("fdatasync", fd);
    return rc;
}

int fsync(int fd) {
    REAL(int, "fsync", int);
    int e = decide(F_FSYNC, fd_counts(fd));
    if (e > 0) { errno = e; return -1; }
    int rc = real(fd);
    if (rc == 0) trace_fd_sync("fsync", fd);
    return rc;
}

/* the log's prefaulter starts writeback ahead of the tail with it (no durability) */
int sync_file_range(int fd, off_t off, off_t n, unsigned int flags) {
    REAL(int, "sync_file_range", int, off_t, off_t, unsigned int);
    int e = decide(F_SYNC_FILE_RANGE, fd_counts(fd));
    if (e > 0) { errno = e; return -1; }
    return real(fd, off, n, flags);
}

int msync(void *addr, size_t n, int flags) {
    REAL(int, "msync", void *, size_t, int);
    int e = decide(F_MSYNC, 1);
    if (e > 0) { errno = e; return -1; }
    int rc = real(addr, n, flags);
    if (rc == 0) trace_msync(addr, n);
    return rc;
}

static int do_posix_fallocate(const char *sym, int fd, off_t off, off_t len) {
    REAL(int, sym, int, off_t, off_t);
    int e = decide(F_FALLOCATE, fd_counts(fd));
    if (e > 0) return e;   /* posix_fallocate returns the error number */
    return real(fd, off, len);
}
int posix_fallocate(int fd, off_t off, off_t len) { return do_posix_fallocate("posix_fallocate", fd, off, len); }
int posix_fallocate64(int fd, off_t off, off_t len) { return do_posix_fallocate("posix_fallocate64", fd, off, len); }

static int do_fallocate(const char *sym, int fd, int mode, off_t off, off_t len) {
    REAL(int, sym, int, int, off_t, off_t);
    int e = decide(F_FALLOCATE, fd_counts(fd));
    if (e > 0) { errno = e; return -1; }
    return real(fd, mode, off, len);
}
int fallocate(int fd, int mode, off_t off, off_t len) { return do_fallocate("fallocate", fd, mode, off, len); }
int fallocate64(int fd, int mode, off_t off, off_t len) { return do_fallocate("fallocate64", fd, mode, off, len); }

static int do_ftruncate(const char *sym, int fd, off_t len) {
    REAL(int, sym, int, off_t);
    int e = decide(F_FTRUNCATE, fd_counts(fd));
    if (e > 0) { errno = e; return -1; }
    return real(fd, len);
}
int ftruncate(int fd, off_t len) { return do_ftruncate("ftruncate", fd, len); }
int ftruncate64(int fd, off_t len) { return do_ftruncate("ftruncate64", fd, len); }

int rename(const char *a, const char *b) {
    REAL(int, "rename", const char *, const char *);
    int e = decide(F_RENAME, path_counts(b));
    if (e > 0) { errno = e; return -1; }
    return real(a, b);
}

int renameat(int da, const char *a, int db, const char *b) {
    REAL(int, "renameat", int, const char *, int, const char *);
    int e = decide(F_RENAME, b[0] == '/' ? path_counts(b) : 1);
    if (e > 0) { errno = e; return -1; }
    return real(da, a, db, b);
}

static int do_open(const char *sym, const char *path, int flags, mode_t mode) {
    REAL(int, sym, const char *, int, ...);
    int e = decide(F_OPEN, path_counts(path));
    if (e > 0) { errno = e; return -1; }
    return real(path, flags, mode);
}
static mode_t mode_arg(int flags, va_list ap) {
    return (flags & (O_CREAT | O_TMPFILE)) ? (mode_t)va_arg(ap, int) : 0;
}
int open(const char *path, int flags, ...) {
    va_list ap; va_start(ap, flags); mode_t m = mode_arg(flags, ap); va_end(ap);
    return do_open("open", path, flags, m);
}
int open64(const char *path, int flags, ...) {
    va_list ap; va_start(ap, flags); mode_t m = mode_arg(flags, ap); va_end(ap);
    return do_open("open64", path, flags, m);
}

static int do_openat(const char *sym, int dfd, const char *path, int flags, mode_t mode) {
    REAL(int, sym, int, const char *, int, ...);
    int e = decide(F_OPEN, path[0] == '/' ? path_counts(path) : 0);
    if (e > 0) { errno = e; return -1; }
    return real(dfd, path, flags, mode);
}
int openat(int dfd, const char *path, int flags, ...) {
    va_list ap; va_start(ap, flags); mode_t m = mode_arg(flags, ap); va_end(ap);
    return do_openat("openat", dfd, path, flags, m);
}
int openat64(int dfd, const char *path, int flags, ...) {
    va_list ap; va_start(ap, flags); mode_t m = mode_arg(flags, ap); va_end(ap);
    return do_openat("openat64", dfd, path, flags, m);
}

static void *do_mmap(const char *sym, void *addr, size_t n, int prot, int flags, int fd, off_t off) {
    REAL(void *, sym, void *, size_t, int, int, int, off_t);
    int e = (fd >= 0 && !(flags & MAP_ANONYMOUS)) ? decide(F_MMAP, fd_counts(fd)) : 0;
    if (e > 0) { errno = e; return MAP_FAILED; }
    return real(addr, n, prot, flags, fd, off);
}
void *mmap(void *addr, size_t n, int prot, int flags, int fd, off_t off) {
    return do_mmap("mmap", addr, n, prot, flags, fd, off);
}
void *mmap64(void *addr, size_t n, int prot, int flags, int fd, off_t off) {
    return do_mmap("mmap64", addr, n, prot, flags, fd, off);
}

static ssize_t do_pread(const char *sym, int fd, void *buf, size_t n, off_t off) {
    REAL(ssize_t, sym, int, void *, size_t, off_t);
    int e = decide(F_PREAD, fd_counts(fd));
    if (e > 0) { errno = e; return -1; }
    return real(fd, buf, n, off);
}
ssize_t pread(int fd, void *buf, size_t n, off_t off) { return do_pread("pread", fd, buf, n, off); }
ssize_t pread64(int fd, void *buf, size_t n, off_t off) { return do_pread("pread64", fd, buf, n, off); }

#include <sys/uio.h>
static ssize_t do_preadv(const char *sym, int fd, const struct iovec *iov, int cnt, off_t off) {
    REAL(ssize_t, sym, int, const struct iovec *, int, off_t);
    int e = decide(F_PREAD, fd_counts(fd));
    if (e > 0) { errno = e; return -1; }
    return real(fd, iov, cnt, off);
}
ssize_t preadv(int fd, const struct iovec *iov, int cnt, off_t off) { return do_preadv("preadv", fd, iov, cnt, off); }
ssize_t preadv64(int fd, const struct iovec *iov, int cnt, off_t off) { return do_preadv("preadv64", fd, iov, cnt, off); }

static ssize_t do_preadv2(const char *sym, int fd, const struct iovec *iov, int cnt, off_t off, int fl) {
    REAL(ssize_t, sym, int, const struct iovec *, int, off_t, int);
    int e = decide(F_PREAD, fd_counts(fd));
    if (e > 0) { errno = e; return -1; }
    return real(fd, iov, cnt, off, fl);
}
ssize_t preadv2(int fd, const struct iovec *iov, int cnt, off_t off, int fl) { return do_preadv2("preadv2", fd, iov, cnt, off, fl); }
ssize_t preadv64v2(int fd, const struct iovec *iov, int cnt, off_t off, int fl) { return do_preadv2("preadv64v2", fd, iov, cnt, off, fl); }
