# Cython view of eng_atomic.h: explicit-order atomics, futex, clocks, pids.
# Every function is pure C that cannot fail, hence noexcept.
from libc.stdint cimport uint32_t, uint64_t, int32_t, int64_t

cdef extern from "eng_atomic.h" nogil:
    int ENG_CACHE_LINE                 # bytes in one cache line (64)
    int ENG_CURSOR_PAD                 # bytes between two shared cursors (128)
    int ENG_HAVE_FUTEX                 # 1 when waits sleep on a real futex
    int ETIMEDOUT
    int EINTR

    uint64_t eng_load_acquire_u64(const uint64_t *p) noexcept
    uint64_t eng_load_relaxed_u64(const uint64_t *p) noexcept
    uint64_t eng_load_seqcst_u64(const uint64_t *p) noexcept
    void eng_store_release_u64(uint64_t *p, uint64_t v) noexcept
    void eng_store_relaxed_u64(uint64_t *p, uint64_t v) noexcept
    void eng_store_seqcst_u64(uint64_t *p, uint64_t v) noexcept
    int eng_cas_u64(uint64_t *p, uint64_t *expected, uint64_t desired) noexcept
    uint64_t eng_fetch_add_u64(uint64_t *p, uint64_t v) noexcept
    uint64_t eng_fetch_add_relaxed_u64(uint64_t *p, uint64_t v) noexcept

    int64_t eng_load_relaxed_i64(const int64_t *p) noexcept
    int64_t eng_load_acquire_i64(const int64_t *p) noexcept
    void eng_store_release_i64(int64_t *p, int64_t v) noexcept
    int64_t eng_fetch_add_i64(int64_t *p, int64_t v) noexcept
    int eng_cas_i64(int64_t *p, int64_t *expected, int64_t desired) noexcept

    uint32_t eng_load_acquire_u32(const uint32_t *p) noexcept
    uint32_t eng_load_relaxed_u32(const uint32_t *p) noexcept
    uint32_t eng_load_seqcst_u32(const uint32_t *p) noexcept
    void eng_store_release_u32(uint32_t *p, uint32_t v) noexcept
    void eng_store_seqcst_u32(uint32_t *p, uint32_t v) noexcept
    uint32_t eng_fetch_add_u32(uint32_t *p, uint32_t v) noexcept
    uint32_t eng_fetch_add_seqcst_u32(uint32_t *p, uint32_t v) noexcept
    uint32_t eng_fetch_sub_seqcst_u32(uint32_t *p, uint32_t v) noexcept
    uint32_t eng_exchange_u32(uint32_t *p, uint32_t v) noexcept
    int eng_cas_u32(uint32_t *p, uint32_t *expected, uint32_t desired) noexcept
    int32_t eng_load_acquire_i32(const int32_t *p) noexcept
    void eng_store_release_i32(int32_t *p, int32_t v) noexcept
    int eng_cas_i32(int32_t *p, int32_t *expected, int32_t desired) noexcept

    void eng_fence_seqcst() noexcept
    void eng_cpu_relax() noexcept

    int64_t eng_now_ns() noexcept
    int64_t eng_wall_ns() noexcept

    int eng_futex_wait(uint32_t *addr, uint32_t expected, int64_t timeout_ns) noexcept
    void eng_futex_wake(uint32_t *addr, int n) noexcept
    int eng_have_futex() noexcept

    int eng_pid_alive(int32_t pid) noexcept

    uint32_t eng_fork_generation() noexcept    # bumped in every forked child
    int eng_install_fork_hook() noexcept       # 0 on success; call once per module
