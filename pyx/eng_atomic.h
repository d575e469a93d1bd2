/*
 * eng_atomic.h -- the few primitives Cython cannot say well: atomics with an
 * explicit memory order, futex wait/wake on shared memory, CPU relax, clocks
 * and process liveness.  Shared by every compiled module through
 * eng_atomic.pxd.
 *
 * Every atomic takes a plain pointer into (possibly shared) memory and names
 * its order.  Where a caller needs an order other than acquire/release it says
 * why at the call site.
 *
 * ENGINE_PORTABLE=1 forces the portable fallbacks (no futex: bounded sleeps),
 * so CI can build and test the branch that non-Linux platforms take.
 */
#ifndef ENG_ATOMIC_H
#define ENG_ATOMIC_H

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#ifndef ENGINE_PORTABLE
#define ENGINE_PORTABLE 0
#endif
#ifndef ENGINE_DEBUG
#define ENGINE_DEBUG 0
#endif

#if defined(__linux__) && !ENGINE_PORTABLE
#define ENG_HAVE_FUTEX 1
#include <linux/futex.h>
#include <sys/syscall.h>
#else
#define ENG_HAVE_FUTEX 0
#endif

#if ENGINE_DEBUG
#include <assert.h>
#define ENG_ASSERT(x) assert(x)
#else
#define ENG_ASSERT(x) ((void)0)
#endif

/* One cache line.  Shared cursors are padded to two lines (128 bytes) so the
 * adjacent-line prefetcher of x86 and the 128-byte lines of Apple silicon do
 * not make two cursors share a line. */
#define ENG_CACHE_LINE 64
#define ENG_CURSOR_PAD 128

/* ---- 64-bit atomics ---------------------------------------------------- */
static inline uint64_t eng_load_acquire_u64(const uint64_t *p) {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
static inline uint64_t eng_load_relaxed_u64(const uint64_t *p) {
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}
static inline uint64_t eng_load_seqcst_u64(const uint64_t *p) {
    return __atomic_load_n(p, __ATOMIC_SEQ_CST);
}
static inline void eng_store_release_u64(uint64_t *p, uint64_t v) {
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}
static inline void eng_store_relaxed_u64(uint64_t *p, uint64_t v) {
    __atomic_store_n(p, v, __ATOMIC_RELAXED);
}
static inline void eng_store_seqcst_u64(uint64_t *p, uint64_t v) {
    __atomic_store_n(p, v, __ATOMIC_SEQ_CST);
}
/* Strong CAS, acq_rel on success, acquire on failure.  Returns 1 on success;
 * on failure *expected holds the value seen. */
static inline int eng_cas_u64(uint64_t *p, uint64_t *expected, uint64_t desired) {
    return __atomic_compare_exchange_n(p, expected, desired, 0,
                                       __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}
static inline uint64_t eng_fetch_add_u64(uint64_t *p, uint64_t v) {
    return __atomic_fetch_add(p, v, __ATOMIC_ACQ_REL);
}
/* Statistics counters: nobody orders anything by them. */
static inline uint64_t eng_fetch_add_relaxed_u64(uint64_t *p, uint64_t v) {
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}

/* ---- signed 64-bit (counters) ------------------------------------------ */
static inline int64_t eng_load_relaxed_i64(const int64_t *p) {
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}
static inline int64_t eng_load_acquire_i64(const int64_t *p) {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
static inline void eng_store_release_i64(int64_t *p, int64_t v) {
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}
static inline int64_t eng_fetch_add_i64(int64_t *p, int64_t v) {
    return __atomic_fetch_add(p, v, __ATOMIC_ACQ_REL);
}
static inline int eng_cas_i64(int64_t *p, int64_t *expected, int64_t desired) {
    return __atomic_compare_exchange_n(p, expected, desired, 0,
                                       __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

/* ---- 32-bit atomics (futex words, flags, pids) ------------------------- */
static inline uint32_t eng_load_acquire_u32(const uint32_t *p) {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
static inline uint32_t eng_load_relaxed_u32(const uint32_t *p) {
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}
static inline uint32_t eng_load_seqcst_u32(const uint32_t *p) {
    return __atomic_load_n(p, __ATOMIC_SEQ_CST);
}
static inline void eng_store_release_u32(uint32_t *p, uint32_t v) {
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}
static inline void eng_store_seqcst_u32(uint32_t *p, uint32_t v) {
    __atomic_store_n(p, v, __ATOMIC_SEQ_CST);
}
static inline uint32_t eng_fetch_add_u32(uint32_t *p, uint32_t v) {
    return __atomic_fetch_add(p, v, __ATOMIC_ACQ_REL);
}
/* seq_cst: a waiter registration must be ordered before the waiter's re-check
 * of the condition, against the waker's store-then-check (Dekker). */
static inline uint32_t eng_fetch_add_seqcst_u32(uint32_t *p, uint32_t v) {
    return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
static inline uint32_t eng_fetch_sub_seqcst_u32(uint32_t *p, uint32_t v) {
    return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST);
}
/* Swap in v, return what was there (acq_rel: a hand-over of a flag). */
static inline uint32_t eng_exchange_u32(uint32_t *p, uint32_t v) {
    return __atomic_exchange_n(p, v, __ATOMIC_ACQ_REL);
}
static inline int eng_cas_u32(uint32_t *p, uint32_t *expected, uint32_t desired) {
    return __atomic_compare_exchange_n(p, expected, desired, 0,
                                       __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}
static inline int32_t eng_load_acquire_i32(const int32_t *p) {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
static inline void eng_store_release_i32(int32_t *p, int32_t v) {
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}
static inline int eng_cas_i32(int32_t *p, int32_t *expected, int32_t desired) {
    return __atomic_compare_exchange_n(p, expected, desired, 0,
                                       __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

/* Full fence: the StoreLoad barrier between "publish" and "is anyone
 * waiting?" (and between "I wait" and "is it there yet?"). */
static inline void eng_fence_seqcst(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

/* ---- spinning ---------------------------------------------------------- */
static inline void eng_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__) || defined(__arm__)
    __asm__ __volatile__("yield" ::: "memory");
#else
    __asm__ __volatile__("" ::: "memory");
#endif
}

/* ---- clocks ------------------------------------------------------------ */
static inline int64_t eng_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}
static inline int64_t eng_wall_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* ---- futex ------------------------------------------------------------- */
/* Sleep while *addr == expected, at most timeout_ns (< 0: no limit).
 * Returns 0 when woken, when the value differs, or on a spurious wake-up;
 * ETIMEDOUT when the time ran out; EINTR when a signal arrived.  Callers
 * always re-check their condition: every return may be spurious.
 * The futex is not FUTEX_PRIVATE: waiter and waker may be different
 * processes mapping the same file. */
static inline int eng_futex_wait(uint32_t *addr, uint32_t expected, int64_t timeout_ns) {
#if ENG_HAVE_FUTEX
    struct timespec ts, *tsp = NULL;
    if (timeout_ns >= 0) {
        ts.tv_sec = (time_t)(timeout_ns / 1000000000LL);
        ts.tv_nsec = (long)(timeout_ns % 1000000000LL);
        tsp = &ts;
    }
    long rc = syscall(SYS_futex, addr, FUTEX_WAIT, expected, tsp, NULL, 0);
    if (rc == 0) return 0;
    if (errno == EAGAIN) return 0;
    if (errno == ETIMEDOUT) return ETIMEDOUT;
    if (errno == EINTR) return EINTR;
    return 0;
#else
    /* Portable fallback: bounded naps.  200 us keeps the wake-up latency
     * small while an idle waiter still costs next to no CPU. */
    int64_t nap = 200000;
    if (__atomic_load_n(addr, __ATOMIC_ACQUIRE) != expected) return 0;
    if (timeout_ns >= 0 && timeout_ns < nap) nap = timeout_ns;
    struct timespec ts = {0, (long)nap};
    if (nanosleep(&ts, NULL) != 0 && errno == EINTR) return EINTR;
    if (timeout_ns >= 0 && timeout_ns <= nap &&
        __atomic_load_n(addr, __ATOMIC_ACQUIRE) == expected)
        return ETIMEDOUT;
    return 0;
#endif
}

/* Wake up to n waiters (INT32_MAX: all). */
static inline void eng_futex_wake(uint32_t *addr, int n) {
#if ENG_HAVE_FUTEX
    syscall(SYS_futex, addr, FUTEX_WAKE, n, NULL, NULL, 0);
#else
    (void)addr;
    (void)n;
#endif
}

static inline int eng_have_futex(void) { return ENG_HAVE_FUTEX; }

/* ---- processes --------------------------------------------------------- */
/* 1 if a process with this pid exists (it may belong to another user: EPERM
 * still means alive).  pid <= 0 is never alive. */
static inline int eng_pid_alive(int32_t pid) {
    if (pid <= 0) return 0;
    if (kill((pid_t)pid, 0) == 0) return 1;
    return errno == EPERM;
}

/* ---- fork generation ------------------------------------------------- */
/* Bumped in every forked child by a pthread_atfork handler (so forks made
 * from C count too).  An object that must not be used across fork() (a queue
 * handle, a group member) records the generation it was made in; another one
 * at use means it was inherited and belongs to the parent.  One relaxed load
 * and a compare per call, no getpid() syscall.  Each compiled module that
 * includes this header has its own counter and installs its own handler
 * (eng_install_fork_hook, once at import). */
static uint32_t eng_fork_gen __attribute__((unused));
static void eng_fork_child_hook(void) {
    __atomic_store_n(&eng_fork_gen, eng_fork_gen + 1, __ATOMIC_RELAXED);
}
static inline uint32_t eng_fork_generation(void) {
    return __atomic_load_n(&eng_fork_gen, __ATOMIC_RELAXED);
}
/* 0 on success (pthread_atfork's result otherwise). */
static inline int eng_install_fork_hook(void) {
    return pthread_atfork(NULL, NULL, eng_fork_child_hook);
}

#endif /* ENG_ATOMIC_H */
