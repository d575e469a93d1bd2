/*
 * sched_layout.h -- the control region of a PriorityQueue / KeyedQueue.
 *
 * The messages themselves travel in ordinary rings (one per level or
 * partition, plus one delay ring per level set / partition); this small
 * region holds what the rings cannot say: the queue's configuration, one
 * doorbell that a consumer waiting on *several* rings sleeps on, and, for a
 * KeyedQueue, the group membership and partition ownership tables.
 * Changing anything here is a new ENG_SCHED_VERSION.
 *
 *   [ meta   128 B ]  immutable after creation
 *   [ bell   128 B ]  producer bumps seq when a consumer is waiting
 *   [ group  128 B ]  membership epoch, token source
 *   [ counts 512 B ]  messages put per level (producer), an emptiness hint
 *   [ config 1792 B]  JSON settings written once by the creator
 *   [ members 64 x 64 B ]
 *   [ parts  4096 x 8 B ]  owner token per partition (0 = unowned)
 */
#ifndef ENG_SCHED_LAYOUT_H
#define ENG_SCHED_LAYOUT_H

#include <stddef.h>
#include <stdint.h>

/* "QESCHED1" little-endian */
#define ENG_SCHED_MAGIC 0x3144454843534551ULL
#define ENG_SCHED_VERSION 2u
#define ENG_SCHED_BLOCK 128u
#define ENG_SCHED_CONFIG_MAX 1792u
#define ENG_SCHED_MAX_MEMBERS 64u
#define ENG_SCHED_MAX_PARTS 4096u
#define ENG_SCHED_KIND_PRIORITY 1u
#define ENG_SCHED_KIND_KEYED 2u

/* member states */
#define ENG_MEMBER_FREE 0u
#define ENG_MEMBER_ACTIVE 1u

typedef struct {
    uint64_t magic;          /* ENG_SCHED_MAGIC, stored last (release) by the creator */
    uint32_t version;        /* ENG_SCHED_VERSION */
    uint32_t kind;           /* ENG_SCHED_KIND_* */
    uint64_t region_size;    /* bytes of the whole region */
    uint32_t config_len;     /* bytes of JSON in config[] */
    uint32_t creator_pid;    /* informational */
    int64_t created_ns;      /* wall clock at creation, informational */
    uint8_t _pad[ENG_SCHED_BLOCK - 40];
} eng_sched_meta_t;

/* The doorbell: producers write seq/delayed, consumers write waiters. */
typedef struct {
    uint32_t seq;            /* futex word; bumped (then woken) when waiters > 0 */
    uint32_t waiters;        /* consumers registered as sleeping (seq_cst) */
    uint64_t delayed;        /* delayed messages put so far (consumers drain the delay ring on change) */
    uint8_t _pad[ENG_SCHED_BLOCK - 16];
} eng_sched_bell_t;

/* KeyedQueue group state. */
typedef struct {
    uint64_t epoch;          /* bumped on every join / leave / reap: consumers rebalance */
    uint64_t next_token;     /* source of unique member tokens (fetch_add) */
    uint64_t closed;         /* 1 once the producer closed (consumers drain, then Closed) */
    uint8_t _pad[ENG_SCHED_BLOCK - 24];
} eng_sched_group_t;

/* Messages put per level, stored (release) by the single producer after each
 * ring put.  A consumer that has seen count c of level i empty skips that
 * ring's try_get while the count is still c: one load instead of a call. */
typedef struct {
    uint64_t put[64];        /* per level, monotonically increasing */
} eng_sched_counts_t;

typedef struct {
    uint64_t token;          /* 0 = free slot; else the member's unique token */
    int64_t pid;             /* member process (liveness check) */
    int64_t joined_ns;       /* wall clock at join, informational */
    uint64_t delivered;      /* messages this member delivered (relaxed, statistics) */
    uint64_t pid_start;      /* start time of `pid` (/proc/PID/stat field 22), 0 = unknown;
                                stored before `pid` (0 in a region of an older build: check by
                                pid alone) */
    uint64_t pid_ns;         /* inode of the member's pid namespace, 0 = unknown; stored before
                                `pid`: a member in another namespace is never taken for dead */
    uint8_t _pad[16];
} eng_sched_member_t;

typedef struct {
    eng_sched_meta_t meta;
    eng_sched_bell_t bell;
    eng_sched_group_t group;
    eng_sched_counts_t counts;
    uint8_t config[ENG_SCHED_CONFIG_MAX];
    eng_sched_member_t members[ENG_SCHED_MAX_MEMBERS];
    uint64_t parts[ENG_SCHED_MAX_PARTS];   /* owner token, 0 = unowned */
} eng_sched_region_t;

#define ENG_SCHED_REGION_SIZE ((uint64_t)sizeof(eng_sched_region_t))

_Static_assert(sizeof(eng_sched_meta_t) == ENG_SCHED_BLOCK, "meta block");
_Static_assert(sizeof(eng_sched_bell_t) == ENG_SCHED_BLOCK, "bell block");
_Static_assert(sizeof(eng_sched_group_t) == ENG_SCHED_BLOCK, "group block");
_Static_assert(sizeof(eng_sched_member_t) == 64, "member slot");
_Static_assert(offsetof(eng_sched_member_t, pid_start) == 32, "member.pid_start");
_Static_assert(offsetof(eng_sched_member_t, pid_ns) == 40, "member.pid_ns");
_Static_assert(offsetof(eng_sched_region_t, bell) == 128, "bell offset");
_Static_assert(offsetof(eng_sched_region_t, group) == 256, "group offset");
_Static_assert(offsetof(eng_sched_region_t, counts) == 384, "counts offset");
_Static_assert(offsetof(eng_sched_region_t, config) == 896, "config offset");
_Static_assert(offsetof(eng_sched_region_t, members) == 2688, "members offset");
_Static_assert(offsetof(eng_sched_region_t, parts) == 2688 + 64 * 64, "parts offset");
_Static_assert(sizeof(eng_sched_region_t) == 2688 + 64 * 64 + 4096 * 8, "region size");
_Static_assert(offsetof(eng_sched_region_t, members) % 64 == 0, "members aligned");

#endif
