/*
 * ring_layout.h -- the byte layout of a ring region, shared by every process
 * that maps it.  Changing anything here is a new RING_LAYOUT_VERSION.
 *
 *   [ header: ring_header_t, padded to RING_HEADER_BYTES(max_consumers) ]
 *   [ data: capacity bytes (a power of two) of 8-byte aligned records    ]
 *
 * Every block that one side writes while another reads sits on its own
 * 128-byte block (two cache lines: the x86 adjacent-line prefetcher and the
 * 128-byte lines of Apple silicon would otherwise make neighbours share).
 *
 * Record: [u32 length][u32 flags] + payload, padded to 8 bytes.  When a record
 * does not fit before the end of the data area, the producer writes a PADDING
 * record that fills the tail (Aeron / Chronicle), so every payload is
 * contiguous and a zero-copy view of it is one slice.
 *
 * Cursors are byte positions that only grow (u64: at 10 GB/s they wrap after
 * 58 years); position p lives at data[p & (capacity - 1)].
 */
#ifndef RING_LAYOUT_H
#define RING_LAYOUT_H

#include <stddef.h>
#include <stdint.h>

/* "QENGRING" little-endian; a region without it is not ours. */
#define RING_MAGIC 0x474E4952474E4551ULL
#define RING_LAYOUT_VERSION 2u

#define RING_BLOCK 128u             /* one padded block per writer */
#define RING_PAGE 4096u
#define RING_REC_HDR 8u             /* u32 length + u32 flags */
#define RING_REC_ALIGN 8u
#define RING_FLAG_PAD 1u            /* record flag: padding to the end of the data area */
#define RING_IDLE UINT64_MAX        /* a consumer cursor that gates nothing */
#define RING_MIN_CAPACITY 4096ull
#define RING_MAX_CAPACITY (1ull << 40)  /* 1 TiB */
#define RING_MAX_CONSUMERS 256u

/* dispatch modes */
#define RING_MODE_SPSC 0u
#define RING_MODE_BROADCAST 1u
#define RING_MODE_SHARED 2u

/* consumer slot states */
#define RING_SLOT_FREE 0u
#define RING_SLOT_ACTIVE 1u

/* Immutable after creation: written once by the creator, validated by attach. */
typedef struct {
    uint64_t magic;          /* RING_MAGIC */
    uint32_t version;        /* RING_LAYOUT_VERSION */
    uint32_t header_size;    /* bytes before the data area (page multiple) */
    uint64_t capacity;       /* bytes in the data area, a power of two */
    uint32_t mode;           /* RING_MODE_* */
    uint32_t max_consumers;  /* slots in the consumer table */
    uint32_t flags;          /* reserved, 0 */
    uint32_t creator_pid;    /* informational */
    uint64_t created_ns;     /* wall clock at creation, informational */
    uint8_t _pad[RING_BLOCK - 48];
} ring_meta_t;

/* Written by the producer only (consumers read head/closed, bump waiters). */
typedef struct {
    uint64_t head;           /* bytes published; release store after the record bytes */
    int32_t pid;             /* process holding the producer role, 0 = none */
    uint32_t closed;         /* 1 once the producer closed: drain, then Closed */
    uint32_t data_seq;       /* futex word consumers sleep on; bumped on publish when waited on */
    uint32_t data_waiters;   /* consumers that may be asleep on data_seq: each adds 1 before its
                                re-check and subtracts 1 after it woke (seq_cst); wakers only
                                read it, so no waker can erase another waiter's registration */
    uint64_t msgs_put;       /* statistics (relaxed) */
    uint64_t bytes_put;      /* statistics (relaxed) */
    uint64_t waits;          /* times the producer slept for space (relaxed) */
    uint64_t lost;           /* shared mode: messages claimed by consumers that died */
    uint64_t pid_start;      /* start time of `pid` (/proc/PID/stat field 22), 0 = unknown:
                                tells a dead producer from a new process that reused its pid.
                                Cleared (CAS from the dead holder's value) before the pid CAS,
                                set after it (see Producer._make). */
    uint64_t pid_ns;         /* inode of the holder's /proc/self/ns/pid, 0 = unknown: a holder
                                in another pid namespace is never taken for dead (its pid
                                means nothing here).  Stored after the pid CAS, before pid_start. */
    uint8_t _pad[RING_BLOCK - 72];
} ring_producer_t;

/* Written by consumers to wake a producer waiting for space, and the
 * retention floor of spsc/broadcast rings. */
typedef struct {
    uint32_t space_seq;      /* futex word the producer sleeps on */
    uint32_t space_waiters;  /* producer threads that may be asleep on space_seq (added before the
                                re-check, subtracted after waking, seq_cst); wakers only read it.
                                A new producer resets it: only the role holder waits on it. */
    uint64_t tail;           /* spsc/broadcast: where a joining consumer starts; data at
                                [tail, head) is kept while no consumer gates it */
    uint8_t _pad[RING_BLOCK - 16];
} ring_space_t;

/* Shared mode: the claim cursor the competing consumers CAS forward. */
typedef struct {
    uint64_t claim;          /* next unclaimed byte position */
    uint8_t _pad[RING_BLOCK - 8];
} ring_claim_t;

/* One consumer.  cursor: spsc/broadcast = next byte to read (RING_IDLE when
 * free); shared = the position being claimed/copied, RING_IDLE between gets. */
typedef struct {
    uint64_t cursor;         /* gates the producer (seq_cst / release stores) */
    int32_t pid;             /* owner process, 0 = none */
    uint32_t state;          /* RING_SLOT_* */
    uint64_t msgs_got;       /* statistics (relaxed) */
    uint64_t bytes_got;      /* statistics (relaxed) */
    uint64_t waits;          /* times this consumer slept for data (relaxed) */
    uint64_t claim_end;      /* shared: end of the batch this consumer is claiming from `cursor`:
                                stored before the claim CAS, 0 again if the CAS fails, so a
                                reaper counts as lost only a range the dead consumer may own,
                                never one it had merely announced */
    uint64_t pid_start;      /* start time of `pid`, 0 = unknown; stored before `pid` */
    uint64_t pid_ns;         /* pid namespace inode of `pid`, 0 = unknown; stored before `pid` */
    uint32_t sleeping;       /* 1 while this consumer is counted in prod.data_waiters: a reaper
                                that frees a dead sleeper's slot takes its count back */
    uint8_t _pad[RING_BLOCK - 68];
} ring_slot_t;

typedef struct {
    ring_meta_t meta;
    ring_producer_t prod;
    ring_space_t space;
    ring_claim_t claim;
    ring_slot_t slots[];     /* max_consumers of them */
} ring_header_t;

_Static_assert(sizeof(ring_meta_t) == RING_BLOCK, "meta block size");
_Static_assert(sizeof(ring_producer_t) == RING_BLOCK, "producer block size");
_Static_assert(sizeof(ring_space_t) == RING_BLOCK, "space block size");
_Static_assert(sizeof(ring_claim_t) == RING_BLOCK, "claim block size");
_Static_assert(sizeof(ring_slot_t) == RING_BLOCK, "slot size");
_Static_assert(offsetof(ring_meta_t, capacity) == 16, "meta.capacity");
_Static_assert(offsetof(ring_meta_t, mode) == 24, "meta.mode");
_Static_assert(offsetof(ring_meta_t, created_ns) == 40, "meta.created_ns");
_Static_assert(offsetof(ring_producer_t, head) == 0, "prod.head");
_Static_assert(offsetof(ring_producer_t, data_seq) == 16, "prod.data_seq");
_Static_assert(offsetof(ring_producer_t, lost) == 48, "prod.lost");
_Static_assert(offsetof(ring_space_t, tail) == 8, "space.tail");
_Static_assert(offsetof(ring_slot_t, claim_end) == 40, "slot.claim_end");
_Static_assert(offsetof(ring_producer_t, pid_start) == 56, "prod.pid_start");
_Static_assert(offsetof(ring_slot_t, pid_start) == 48, "slot.pid_start");
_Static_assert(offsetof(ring_producer_t, pid_ns) == 64, "prod.pid_ns");
_Static_assert(offsetof(ring_slot_t, pid_ns) == 56, "slot.pid_ns");
_Static_assert(offsetof(ring_slot_t, sleeping) == 64, "slot.sleeping");
_Static_assert(offsetof(ring_header_t, prod) == 1 * RING_BLOCK, "header.prod");
_Static_assert(offsetof(ring_header_t, space) == 2 * RING_BLOCK, "header.space");
_Static_assert(offsetof(ring_header_t, claim) == 3 * RING_BLOCK, "header.claim");
_Static_assert(offsetof(ring_header_t, slots) == 4 * RING_BLOCK, "header.slots");
_Static_assert(sizeof(ring_header_t) == 4 * RING_BLOCK, "fixed header part");
/* futex words must be 4-byte aligned; u64 cursors 8-byte aligned */
_Static_assert(offsetof(ring_producer_t, data_seq) % 4 == 0, "futex alignment");
_Static_assert(offsetof(ring_space_t, space_seq) % 4 == 0, "futex alignment");

/* Bytes before the data area for a table of n consumers: whole pages, so the
 * data area is page aligned (one page for up to 28 consumers). */
static inline uint64_t ring_header_bytes(uint32_t n) {
    uint64_t raw = (uint64_t)sizeof(ring_header_t) + (uint64_t)n * RING_BLOCK;
    return (raw + RING_PAGE - 1) & ~(uint64_t)(RING_PAGE - 1);
}
_Static_assert(RING_MAX_CONSUMERS * RING_BLOCK + 4 * RING_BLOCK <= 9 * RING_PAGE, "max header");

/* Bytes a record of n payload bytes occupies (header + payload, 8-aligned). */
static inline uint64_t ring_rec_size(uint64_t n) {
    return (RING_REC_HDR + n + (RING_REC_ALIGN - 1)) & ~(uint64_t)(RING_REC_ALIGN - 1);
}

#endif /* RING_LAYOUT_H */
