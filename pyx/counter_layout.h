/*
 * counter_layout.h -- memory layout of sharded counters and counter maps, and
 * the two C operations on a cell that Cython cannot say well (an add that
 * refuses to overflow, an exchange).
 *
 * A region (anonymous memory or a file under /dev/shm) is:
 *
 *   ShardedCounter:  [eng_counter_header][cell 0][cell 1]...[cell shards-1]
 *                    each cell an int64 alone on its own 128-byte block, so two
 *                    adders on different shards never touch the same line (the
 *                    adjacent-line prefetcher of x86 pulls lines in pairs).
 *
 *   CounterMap:      [eng_counter_header][slot 0..capacity-1][row 0..shards-1]
 *                    slots hold the keys (open addressing, linear probing);
 *                    row s holds shard s's int64 for every slot, so a shard's
 *                    cells for different keys are contiguous and two shards
 *                    never share a line (rows start on 128-byte boundaries).
 *
 * Every size and offset is recomputed from (kind, shards, capacity) and
 * checked against the header and the file size on attach, so a corrupt header
 * can never make the code read or write outside the mapping.
 */
#ifndef ENG_COUNTER_LAYOUT_H
#define ENG_COUNTER_LAYOUT_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#if defined(__linux__)
#include <sys/syscall.h>
#endif
#include <pthread.h>

#define ENG_COUNTER_MAGIC 0x31544e4345455551ULL /* "QEECNT1" little-endian */
#define ENG_COUNTER_VERSION 1u
#define ENG_COUNTER_KIND_COUNTER 1u
#define ENG_COUNTER_KIND_MAP 2u
#define ENG_COUNTER_BLOCK 128u        /* one cell / one slot / row alignment */
#define ENG_COUNTER_MAX_SHARDS 4096u
#define ENG_COUNTER_MAX_CAPACITY (1u << 24)
#define ENG_COUNTER_KEY_MAX 104u      /* key bytes stored inline in a slot */

/* Slot states (low 32 bits of eng_counter_slot.state).  A claimer writes
 * BUSY with its pid in the high 32 bits, so a prober stuck behind a BUSY slot
 * can tell a slow inserter from a dead one and mark the slot DEAD (skipped by
 * every later probe, never reused: the dead inserter may have left half a key). */
#define ENG_SLOT_EMPTY 0u
#define ENG_SLOT_READY 1u
#define ENG_SLOT_BUSY 2u
#define ENG_SLOT_DEAD 3u

typedef struct {
    uint64_t magic;        /* ENG_COUNTER_MAGIC, stored last by the creator */
    uint32_t version;      /* ENG_COUNTER_VERSION */
    uint32_t kind;         /* ENG_COUNTER_KIND_* */
    uint32_t shards;       /* cells per counter (1..ENG_COUNTER_MAX_SHARDS) */
    uint32_t capacity;     /* map slots, a power of two; 0 for a counter */
    uint64_t total_size;   /* bytes of the whole region */
    uint64_t used;         /* map: slots that became READY (relaxed counter) */
    uint64_t created_ns;   /* wall clock at creation, for `counter ls` */
    int32_t creator_pid;   /* informational */
    uint32_t key_max;      /* ENG_COUNTER_KEY_MAX at creation */
    uint8_t _pad[ENG_COUNTER_BLOCK - 56];
} eng_counter_header;

typedef struct {
    int64_t value;         /* this shard's share of the count */
    uint8_t _pad[ENG_COUNTER_BLOCK - 8];
} eng_counter_cell;

typedef struct {
    uint64_t state;        /* ENG_SLOT_* | (claimer pid << 32) while BUSY */
    uint64_t hash;         /* FNV-1a 64 of (flags, key), written before READY */
    uint32_t keylen;       /* bytes of key used (<= ENG_COUNTER_KEY_MAX) */
    uint32_t flags;        /* 1: the key was a str (utf-8 stored), 0: bytes */
    uint8_t key[ENG_COUNTER_KEY_MAX];
} eng_counter_slot;

_Static_assert(sizeof(eng_counter_header) == ENG_COUNTER_BLOCK, "header is one block");
_Static_assert(offsetof(eng_counter_header, magic) == 0, "magic first");
_Static_assert(offsetof(eng_counter_header, shards) == 16, "header layout");
_Static_assert(offsetof(eng_counter_header, total_size) == 24, "header layout");
_Static_assert(offsetof(eng_counter_header, used) == 32, "header layout");
_Static_assert(offsetof(eng_counter_header, key_max) == 52, "header layout");
_Static_assert(sizeof(eng_counter_cell) == ENG_COUNTER_BLOCK, "one cell per block");
_Static_assert(sizeof(eng_counter_slot) == ENG_COUNTER_BLOCK, "one slot per block");
_Static_assert(offsetof(eng_counter_slot, key) == 24, "slot layout");

static inline uint64_t eng_counter_row_stride(uint32_t capacity) {
    uint64_t b = (uint64_t)capacity * 8u;
    return (b + ENG_COUNTER_BLOCK - 1) / ENG_COUNTER_BLOCK * ENG_COUNTER_BLOCK;
}

/* Region size for (kind, shards, capacity); 0 when the triple is invalid. */
static inline uint64_t eng_counter_region_size(uint32_t kind, uint32_t shards, uint32_t capacity) {
    if (shards < 1 || shards > ENG_COUNTER_MAX_SHARDS) return 0;
    if (kind == ENG_COUNTER_KIND_COUNTER) {
        if (capacity != 0) return 0;
        return sizeof(eng_counter_header) + (uint64_t)shards * sizeof(eng_counter_cell);
    }
    if (kind == ENG_COUNTER_KIND_MAP) {
        if (capacity < 2 || capacity > ENG_COUNTER_MAX_CAPACITY) return 0;
        if (capacity & (capacity - 1)) return 0;
        return sizeof(eng_counter_header) + (uint64_t)capacity * sizeof(eng_counter_slot) +
               (uint64_t)shards * eng_counter_row_stride(capacity);
    }
    return 0;
}

/* ---- cells ------------------------------------------------------------- */
/* Add n to *cell unless the cell would leave int64.  Returns 0, or -1 (cell
 * unchanged) on overflow.  Relaxed order throughout: a count orders nothing
 * else, and the atomic read-modify-write alone makes every add land exactly
 * once.  The CAS loop rarely retries: a cell is private to its shard's
 * threads. */
static inline int eng_cell_add(int64_t *cell, int64_t n) {
    int64_t old = __atomic_load_n(cell, __ATOMIC_RELAXED);
    int64_t sum;
    do {
        if (__builtin_add_overflow(old, n, &sum)) return -1;
    } while (!__atomic_compare_exchange_n(cell, &old, sum, 1, __ATOMIC_RELAXED,
                                          __ATOMIC_RELAXED));
    return 0;
}

/* A plain atomic fetch_add, no overflow check: only the benchmark's
 * single-shared-cell reference (engine._counter._AtomicCell) uses it, as the
 * strongest form of "one int64 on one cache line" (one lock xadd on x86; a
 * CAS loop would re-read the line on every failed attempt). */
static inline void eng_cell_fetch_add(int64_t *cell, int64_t n) {
    __atomic_fetch_add(cell, n, __ATOMIC_RELAXED);
}

/* Swap in v and return what was there: reset() drains each cell with it, so
 * an add racing a reset is either in the returned total or still counted. */
static inline int64_t eng_cell_exchange(int64_t *cell, int64_t v) {
    return __atomic_exchange_n(cell, v, __ATOMIC_RELAXED);
}

static inline int64_t eng_cell_load(const int64_t *cell) {
    return __atomic_load_n(cell, __ATOMIC_RELAXED);
}

/* Sum n cells spaced `stride` bytes apart into a 128-bit total, so the sum of
 * in-range cells is exact even when it leaves int64 (the caller raises). */
static inline void eng_cells_sum(const char *first, uint64_t stride, uint32_t n,
                                 int64_t *hi_out, uint64_t *lo_out) {
    __int128 total = 0;
    for (uint32_t i = 0; i < n; i++)
        total += __atomic_load_n((const int64_t *)(first + (uint64_t)i * stride), __ATOMIC_RELAXED);
    *hi_out = (int64_t)(total >> 64);
    *lo_out = (uint64_t)total;
}

/* ---- which shard is mine ----------------------------------------------- */
/* The caller's thread number, computed once per thread and cached in TLS.  On
 * Linux it is the kernel thread id: ids are handed out sequentially, so the
 * threads and worker processes started together (the usual adders) land on
 * distinct shards modulo a power of two, better than a random hash would.
 * Elsewhere (and in the ENGINE_PORTABLE build, so CI compiles and tests this
 * branch) a mix of pthread_self() and the pid.  A forked child inherits the
 * parent's TLS, so an atfork handler clears it in the child.  Handles do not
 * read it per add: they cache their cell per (thread state, fork generation)
 * and call this only when the caller changed (a TLS read in a dlopen()ed
 * module is a call to __tls_get_addr). */
static __thread uint32_t eng_tls_thread_tag;   /* tag + 1; 0 = not computed */

#ifndef ENGINE_PORTABLE
#define ENGINE_PORTABLE 0
#endif

static inline uint32_t eng_counter_thread_tag_slow(void) {
    uint64_t t;
#if defined(__linux__) && defined(SYS_gettid) && !ENGINE_PORTABLE
    t = (uint64_t)syscall(SYS_gettid);
#else
    t = (uint64_t)(uintptr_t)pthread_self() * 0x9E3779B97F4A7C15ULL;
    t ^= (uint64_t)getpid() * 0xC2B2AE3D27D4EB4FULL;
    t ^= t >> 29;
#endif
    eng_tls_thread_tag = (uint32_t)t + 1u;
    if (eng_tls_thread_tag == 0) eng_tls_thread_tag = 1;
    return eng_tls_thread_tag - 1u;
}

static inline uint32_t eng_counter_thread_tag(void) {
    uint32_t t = eng_tls_thread_tag;
    if (__builtin_expect(t != 0, 1)) return t - 1u;
    return eng_counter_thread_tag_slow();
}

/* Bumped in every forked child.  A handle caches its shard pointer per
 * (Python thread state, fork generation): the thread state alone would be
 * the same pointer in a child forked from that thread, which must pick its
 * own shard (its tid differs), not keep adding to its parent's. */
static uint32_t eng_counter_fork_gen;

static void eng_counter_atfork_child(void) {
    eng_tls_thread_tag = 0;
    eng_counter_fork_gen++;
}

static inline uint32_t eng_counter_fork_generation(void) { return eng_counter_fork_gen; }

static inline int eng_counter_install_atfork(void) {
    return pthread_atfork(NULL, NULL, eng_counter_atfork_child);
}

/* ---- keys -------------------------------------------------------------- */
/* FNV-1a 64 over the flag byte then the key: stable across processes and
 * runs (Python's hash() is randomized per process), then a final avalanche
 * so the low bits used for the slot index depend on every byte. */
static inline uint64_t eng_counter_hash(const uint8_t *key, uint32_t n, uint32_t flags) {
    uint64_t h = 0xcbf29ce484222325ULL;
    h ^= (uint8_t)flags;
    h *= 0x100000001b3ULL;
    for (uint32_t i = 0; i < n; i++) {
        h ^= key[i];
        h *= 0x100000001b3ULL;
    }
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    return h;
}

#endif /* ENG_COUNTER_LAYOUT_H */
