/*
 * mpq_layout.h -- the byte layout of a multi-producer multi-consumer queue
 * region (engine._mpq), shared by every process that maps it.  Changing
 * anything here is a new MPQ_LAYOUT_VERSION.
 *
 *   [ header: mpq_header_t (MPQ_HEADER_BYTES)                            ]
 *   [ data: capacity bytes (a power of two) of 8-byte aligned records    ]
 *
 * Producers serialise on a robust lock (mpq_lock_t) and so do consumers; the
 * two sides meet only through the tail/head cursors, like an SPSC ring
 * between "whoever holds the producer lock" and "whoever holds the consumer
 * lock".  A lock records its holder's pid (the futex word itself, set by one
 * CAS, so there is no instant where it is held by nobody known) and start
 * time; a waiter that finds the holder dead takes the lock over.
 *
 * Crash consistency: a side's cursor moves in one release store after the
 * record bytes are written (producer) or copied out (consumer), so a holder
 * killed at any instruction leaves either the whole record or none of it.
 * Each side also keeps a message count next to its byte cursor.  The count
 * moves before pos (so a consumer that got a message never sees it uncounted:
 * task_done checks against the count), which makes the pair a small journal:
 * prev_count, pend_pos, pend_count, count, then pos (the commit point).  A
 * lock taker finding pos == pend_pos keeps count = pend_count, otherwise
 * rolls count back to prev_count; then pend_* = the committed pair again.
 *
 * Every block that one side writes while another reads sits in its own
 * 128-byte block (two cache lines: the x86 adjacent-line prefetcher).
 *
 * Record: [u32 length][u32 kind] + payload, padded to 8 bytes.  A record that
 * does not fit before the end of the data area is preceded by a PAD record
 * filling the tail, so every payload is contiguous.  Cursors are byte
 * positions that only grow; position p lives at data[p & (capacity - 1)].
 */
#ifndef MPQ_LAYOUT_H
#define MPQ_LAYOUT_H

#include <stddef.h>
#include <stdint.h>

/* "QENGMPQ1" little-endian; a region without it is not ours. */
#define MPQ_MAGIC 0x3151504D474E4551ULL
#define MPQ_LAYOUT_VERSION 1u

#define MPQ_BLOCK 128u
#define MPQ_REC_HDR 8u
#define MPQ_REC_ALIGN 8u
#define MPQ_MIN_CAPACITY 4096ull
#define MPQ_MAX_CAPACITY (1ull << 40)

/* record kinds */
#define MPQ_KIND_PAD 0u      /* padding to the end of the data area */
#define MPQ_KIND_PICKLE 1u   /* a protocol-5 pickle, no out-of-band buffers */
#define MPQ_KIND_BYTES 2u    /* a bytes object, raw */
#define MPQ_KIND_OOB 3u      /* mpq_oob_t, pickle, then each out-of-band buffer */
#define MPQ_KIND_MAX 3u

/* queue flavours (what the creator made; attach reports it) */
#define MPQ_FLAVOUR_QUEUE 0u
#define MPQ_FLAVOUR_JOINABLE 1u
#define MPQ_FLAVOUR_SIMPLE 2u

/* Immutable after creation: written once by the creator, validated by attach. */
typedef struct {
    uint64_t magic;          /* MPQ_MAGIC, stored last (release) */
    uint32_t version;        /* MPQ_LAYOUT_VERSION */
    uint32_t header_size;    /* bytes before the data area */
    uint64_t capacity;       /* bytes in the data area, a power of two */
    uint64_t maxsize;        /* most messages queued at once, 0 = no count limit */
    uint32_t flavour;        /* MPQ_FLAVOUR_* */
    uint32_t creator_pid;    /* informational */
    uint64_t created_ns;     /* wall clock at creation, informational */
    uint8_t _pad[MPQ_BLOCK - 48];
} mpq_meta_t;

/* A robust lock.  owner is the futex word: 0 free, else the holder's pid. */
typedef struct {
    uint32_t owner;          /* holder pid, set by CAS from 0 (or from a dead holder's pid) */
    uint32_t waiters;        /* 1: a thread may sleep on owner (set by it, cleared by the waker) */
    uint64_t owner_start;    /* holder's start time (/proc stat field 22), 0 = unknown;
                                set after the CAS, cleared before the release */
    uint64_t takeovers;      /* locks taken from a dead holder (statistics) */
    uint64_t owner_ns;       /* holder's pid namespace (inode of /proc/self/ns/pid), 0 = unknown;
                                a holder in another namespace is never judged by its pid */
    uint8_t _pad[MPQ_BLOCK - 32];
} mpq_lock_t;

/* One side's cursor, written only by that side's lock holder. */
typedef struct {
    uint64_t pos;            /* tail (producers) / head (consumers); release store = commit */
    uint64_t count;          /* messages put / got: stored just before pos */
    uint64_t pend_pos;       /* the pos the holder is about to commit */
    uint64_t pend_count;     /* the count that goes with pend_pos */
    uint64_t prev_count;     /* the count before this commit (the roll-back value) */
    uint8_t _pad[MPQ_BLOCK - 40];
} mpq_cursor_t;

/* A doorbell: waiters sleep on seq; a waker that finds waiters set clears it,
 * bumps seq and wakes them all. */
typedef struct {
    uint32_t seq;            /* futex word */
    uint32_t waiters;        /* 1: a sleeper may be on seq (set by it, seq_cst; cleared by the waker) */
    uint8_t _pad[MPQ_BLOCK - 8];
} mpq_bell_t;

/* JoinableQueue: tasks done; unfinished = prod.count - done. */
typedef struct {
    uint64_t done;           /* task_done calls (CAS, never above prod.count) */
    uint32_t seq;            /* futex word join() sleeps on */
    uint32_t waiters;        /* 1: a join() may sleep on seq (as in mpq_bell_t) */
    uint8_t _pad[MPQ_BLOCK - 16];
} mpq_tasks_t;

typedef struct {
    mpq_meta_t meta;         /* immutable */
    mpq_lock_t plock;        /* producers' lock */
    mpq_cursor_t prod;       /* tail and messages put */
    mpq_lock_t clock;        /* consumers' lock */
    mpq_cursor_t cons;       /* head and messages got */
    mpq_bell_t data;         /* consumers waiting for a message */
    mpq_bell_t space;        /* producers waiting for room */
    mpq_tasks_t tasks;       /* JoinableQueue accounting */
} mpq_header_t;

#define MPQ_HEADER_BYTES 1024u

/* Out-of-band record payload: this table, the pickle, then each buffer,
 * every part starting 8-aligned.  nbufs lengths follow the table. */
typedef struct {
    uint32_t nbufs;          /* out-of-band buffers */
    uint32_t _reserved;      /* 0 */
    uint64_t pickle_len;     /* bytes of the pickle stream */
    /* uint64_t buf_len[nbufs]; */
} mpq_oob_t;

_Static_assert(sizeof(mpq_meta_t) == MPQ_BLOCK, "meta is one block");
_Static_assert(sizeof(mpq_lock_t) == MPQ_BLOCK, "lock is one block");
_Static_assert(sizeof(mpq_cursor_t) == MPQ_BLOCK, "cursor is one block");
_Static_assert(sizeof(mpq_bell_t) == MPQ_BLOCK, "bell is one block");
_Static_assert(sizeof(mpq_tasks_t) == MPQ_BLOCK, "tasks is one block");
_Static_assert(offsetof(mpq_meta_t, maxsize) == 24, "meta.maxsize");
_Static_assert(offsetof(mpq_meta_t, created_ns) == 40, "meta.created_ns");
_Static_assert(offsetof(mpq_lock_t, owner_start) == 8, "lock.owner_start");
_Static_assert(offsetof(mpq_lock_t, owner_ns) == 24, "lock.owner_ns");
_Static_assert(offsetof(mpq_cursor_t, prev_count) == 32, "cursor.prev_count");
_Static_assert(offsetof(mpq_header_t, plock) == 128, "plock");
_Static_assert(offsetof(mpq_header_t, prod) == 256, "prod");
_Static_assert(offsetof(mpq_header_t, clock) == 384, "clock");
_Static_assert(offsetof(mpq_header_t, cons) == 512, "cons");
_Static_assert(offsetof(mpq_header_t, data) == 640, "data");
_Static_assert(offsetof(mpq_header_t, space) == 768, "space");
_Static_assert(offsetof(mpq_header_t, tasks) == 896, "tasks");
_Static_assert(sizeof(mpq_header_t) == MPQ_HEADER_BYTES, "header size");
_Static_assert(sizeof(mpq_oob_t) == 16, "oob table");

#endif /* MPQ_LAYOUT_H */
