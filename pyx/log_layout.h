/*
 * log_layout.h -- on-disk layout of the segment log (engine._log).
 *
 * Little-endian, fixed-width fields, every structure a multiple of 8 bytes so
 * records stay 8-byte aligned in the memory-mapped segment.  The static
 * asserts pin offsets and sizes: changing any of them is a format change
 * (bump ENG_LOG_FORMAT and the magic).
 *
 * Segment file  %020d.seg (base offset), preallocated to segment_bytes:
 *     [eng_seg_header 64 B][frame][frame]...[EOS marker][zeros...]
 * Frame (plain: one record, what `append` writes):
 *     [eng_rec_header 32 B][key][value][zero padding to 8 B]
 *     length  = 32 + key_len + value_len (unpadded; 0 = not written yet)
 *     crc     = CRC32C over the 4 bytes of `length` followed by bytes
 *               [8, align8(length)) of the frame: offset, timestamp,
 *               key_len, flags, key, value and padding.  Covering the length
 *               word and the padding means every bit of a sealed segment is
 *               checked: a flipped length cannot silently move the value's
 *               end, a flipped padding byte is a CRC error.
 *     The length word is stored LAST with release ordering: a reader that
 *     loads a non-zero length with acquire ordering sees the whole frame.
 * Batch frame (flags = ENG_REC_FLAG_BATCH alone, what `append_many` writes
 * for two or more records; Kafka's v2 record batch: one header and one CRC
 * for many records, varints inside).  The same 32-byte header, length and
 * CRC rules; the fields mean:
 *     offset       = first offset the frame covers
 *     timestamp_ns = base timestamp
 *     key_len      = span: the frame covers offsets [offset, offset + span),
 *                    the next frame's offset is offset + span (a plain
 *                    frame's span is 1)
 *     body         = one or more inner records, back to back, filling
 *                    [32, length) exactly:
 *         [varint body_len]  bytes of the rest of this inner record
 *         [attr 1 B]         ENG_INNER_* bits; unknown bits are corruption
 *         [varint offset_delta]  strictly increasing, < span
 *         [varint ts_delta]      timestamp = base + ts_delta, non-decreasing
 *         [varint key_len]       only with ENG_INNER_KEY
 *         [key][value]           value = whatever body_len leaves
 *     Varints are unsigned LEB128 (7 bits a byte, low first, at most 10
 *     bytes).  The dense writer writes offset_delta = i and span = count;
 *     deltas leave room for frames with gaps (key compaction).  A 64-byte
 *     value without a key takes 68 bytes.  A CRC-valid frame whose inner
 *     records break any rule above is corruption, like a CRC mismatch.  A
 *     frame is written and published whole, so a torn batch is dropped whole.
 * Hole frame (flags = ENG_REC_FLAG_HOLE alone, length 32, no body): key
 *     compaction removed the records at offsets [offset, offset + key_len)
 *     (key_len = span >= 1, as in a batch frame); timestamp_ns = the last
 *     removed record's.  Readers skip it: a seek into it continues at the
 *     next record.  A compacted sealed segment (engine.compaction) holds the
 *     frames it kept byte for byte, batch frames rewritten without their
 *     removed inner records (same offset, timestamp and span), and one hole
 *     frame per run of removed offsets between them; its file is cut to the
 *     bytes used and its header's segment_bytes says so.
 * Tombstone (Log.delete): a plain frame with ENG_REC_FLAG_TOMBSTONE and
 *     ENG_REC_FLAG_KEY and an empty value, or an inner record with
 *     ENG_INNER_TOMBSTONE (a key, an empty value).
 * End-of-segment (EOS) marker: a 32-byte record with flags = EOS, key_len 0,
 *     offset = the base offset of the next segment; it consumes no offset.
 *     Everything after it is zero.
 * Versions: segment header version 2 (ENG_SEG_VERSION) may hold batch frames;
 * version 1 segments (ENG_SEG_VERSION_MIN) never do: the writer appends
 * only plain frames to a version-1 segment it resumes, and new segments are
 * version 2.  The meta file's "format" (ENG_LOG_FORMAT) is 2 once a writer
 * of this layout opened the log, so a writer of version 1 refuses it.
 */
#ifndef ENG_LOG_LAYOUT_H
#define ENG_LOG_LAYOUT_H

#include <stddef.h>
#include <stdint.h>

#define ENG_LOG_FORMAT 2          /* meta "format" written; 1 is still read */
#define ENG_LOG_FORMAT_MIN 1
#define ENG_SEG_VERSION 2         /* segment header version written */
#define ENG_SEG_VERSION_MIN 1     /* oldest segment version read (no batch frames) */
#define ENG_SEG_MAGIC "QELOGSG1"      /* 8 bytes, no NUL stored */
#define ENG_IDX_MAGIC "QELOGIX1"      /* offset index file */
#define ENG_TIX_MAGIC "QELOGTX1"      /* time index file */
#define ENG_NOTIFY_MAGIC 0x324e4f54u  /* "TON2": initialised by a writer that keeps `published`
                                         (the first format, "TONQ", had no published word:
                                         readers of such a block trust length words alone) */

#define ENG_REC_FLAG_EOS 1u           /* end-of-segment marker */
#define ENG_REC_FLAG_KEY 2u           /* the record has a key (possibly empty) */
#define ENG_REC_FLAG_BATCH 4u         /* a batch frame (see above); no other flag with it */
#define ENG_REC_FLAG_TOMBSTONE 8u     /* a plain frame that deletes its key: key set, value empty */
#define ENG_REC_FLAG_HOLE 16u         /* a hole frame (see above); no other flag with it */
#define ENG_REC_FLAGS_KNOWN 31u

/* attr byte of an inner record of a batch frame */
#define ENG_INNER_KEY 1u              /* a key (possibly empty) precedes the value */
#define ENG_INNER_TOMBSTONE 2u        /* a deleted key (a key, an empty value) */
#define ENG_INNER_KNOWN 3u

/* One sparse index entry per this many bytes of segment. */
#define ENG_INDEX_INTERVAL 4096

typedef struct {
    char magic[8];          /* ENG_SEG_MAGIC */
    uint32_t version;       /* ENG_SEG_VERSION (ENG_SEG_VERSION_MIN..ENG_SEG_VERSION read) */
    uint32_t header_size;   /* sizeof(eng_seg_header) */
    uint64_t base_offset;   /* offset of the first record; equals the file name */
    uint64_t segment_bytes; /* preallocated file size */
    uint8_t log_id[16];     /* uuid of the log (meta): refuses foreign segments */
    int64_t created_ns;     /* wall clock at creation, >= every timestamp of the previous segment */
    uint32_t flags;         /* 0 */
    uint32_t header_crc;    /* CRC32C of bytes [0, 60) */
} eng_seg_header;

typedef struct {
    uint32_t length;        /* 32 + key_len + value_len (batch: 32 + body); stored last (release); 0 = empty */
    uint32_t crc;           /* see above */
    uint64_t offset;        /* dense, one per record (batch: its first offset) */
    int64_t timestamp_ns;   /* wall clock, non-decreasing within a log (batch: base) */
    uint32_t key_len;       /* bytes of key following the header (batch: span) */
    uint32_t flags;         /* ENG_REC_FLAG_* */
} eng_rec_header;

/* The `notify` file: readers sleep on `seq` (a futex on a MAP_SHARED
 * mapping, so it works across processes); the writer bumps it and wakes them
 * only while `waiters` is non-zero.
 *
 * `published` = (low 32 bits of the active segment's base << 32) | position:
 * in the active segment, only records that end at or before that position are
 * complete.  The durable path writes records with pwrite (see below), which
 * copies bytes in no defined order, so a length word alone does not prove its
 * record complete there; a reader of the active segment reads up to
 * `published` only.  Segments below `active_base` are sealed: length words
 * suffice.  The writer stores `published` (release) after the bytes and, at a
 * roll, the new segment's `published` before its `active_base`. */
typedef struct {
    uint32_t magic;         /* ENG_NOTIFY_MAGIC */
    uint32_t seq;           /* futex word: bumped when records or segments appear */
    uint32_t waiters;       /* readers currently sleeping (seq_cst inc/dec) */
    uint32_t _pad0;
    uint64_t active_base;   /* base of the writer's active segment (release store after
                               the segment file exists): a reader that meets a zero length
                               word in an older segment knows its end marker is damaged */
    uint64_t published;     /* (base low 32 bits << 32) | end of the complete records (release) */
    uint64_t published_next; /* 1 + the offset after the last published record, stored
                               (release) before `published`: a reader's lag without walking
                               records; 0 = never set (a writer built before this field) */
    uint8_t _pad[24];
} eng_notify;

/* Header of the .idx / .tix files; entries follow. */
typedef struct {
    char magic[8];          /* ENG_IDX_MAGIC or ENG_TIX_MAGIC */
    uint64_t base_offset;   /* segment the index belongs to */
    uint32_t count;         /* entries that follow */
    uint32_t covered;       /* segment position up to which the entries are complete */
    uint32_t crc;           /* CRC32C of the entries */
    uint32_t header_crc;    /* CRC32C of bytes [0, 28) */
} eng_index_header;

typedef struct {
    uint32_t rel_offset;    /* offset - base_offset */
    uint32_t position;      /* byte position of that record in the segment */
} eng_idx_entry;

typedef struct {
    int64_t timestamp_ns;   /* timestamp of that record */
    uint32_t rel_offset;    /* offset - base_offset */
    uint32_t position;      /* byte position of that record in the segment */
} eng_tix_entry;

_Static_assert(sizeof(eng_seg_header) == 64, "segment header is 64 bytes");
_Static_assert(offsetof(eng_seg_header, base_offset) == 16, "base_offset at 16");
_Static_assert(offsetof(eng_seg_header, log_id) == 32, "log_id at 32");
_Static_assert(offsetof(eng_seg_header, header_crc) == 60, "header_crc at 60");
_Static_assert(sizeof(eng_rec_header) == 32, "record header is 32 bytes");
_Static_assert(offsetof(eng_rec_header, crc) == 4, "crc at 4");
_Static_assert(offsetof(eng_rec_header, offset) == 8, "offset at 8");
_Static_assert(offsetof(eng_rec_header, timestamp_ns) == 16, "timestamp at 16");
_Static_assert(offsetof(eng_rec_header, key_len) == 24, "key_len at 24");
_Static_assert(offsetof(eng_rec_header, flags) == 28, "flags at 28");
_Static_assert(sizeof(eng_notify) == 64, "notify block is one cache line");
_Static_assert(offsetof(eng_notify, seq) == 4, "seq at 4");
_Static_assert(offsetof(eng_notify, active_base) == 16, "active_base at 16");
_Static_assert(offsetof(eng_notify, published) == 24, "published at 24");
_Static_assert(offsetof(eng_notify, published_next) == 32, "published_next at 32");
_Static_assert(sizeof(eng_index_header) == 32, "index header is 32 bytes");
_Static_assert(sizeof(eng_idx_entry) == 8, "idx entry is 8 bytes");
_Static_assert(sizeof(eng_tix_entry) == 16, "tix entry is 16 bytes");

/* ---- making a written range durable ----------------------------------
 * Linux: msync(MS_SYNC) on a MAP_SHARED file mapping runs
 * vfs_fsync_range(file, start, end, datasync=1), i.e. exactly fdatasync
 * restricted to the range (including the unwritten-extent conversion of a
 * preallocated file); a second fdatasync would only add another device
 * flush (~25% of a durable append here).  Elsewhere msync's guarantee is
 * weaker, so fsync follows it (macOS: F_FULLFSYNC, since its fsync does not
 * flush the drive cache).  Returns 0 or -1 (errno set). */
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

/* fsync, or F_FULLFSYNC where macOS has it (its plain fsync stops at the
 * drive's cache); the fallback for the non-Linux paths below */
static inline int eng_log_fsync_full(int fd) {
#if defined(__APPLE__) && defined(F_FULLFSYNC)
    if (fcntl(fd, F_FULLFSYNC) == 0) return 0;
#endif
    return fsync(fd);
}

static inline int eng_log_sync_range(int fd, void *addr, size_t len) {
    if (len && msync(addr, len, MS_SYNC) != 0) return -1;
#if defined(__linux__)
    (void)fd;
    return 0;
#else
    return eng_log_fsync_full(fd);
#endif
}

/* ---- the durable append path (durability="always") -------------------
 * Storing into a MAP_SHARED file mapping after a sync write-protected its
 * pages takes a page_mkwrite fault, and on ext4 here that dirties the inode
 * so the next fdatasync writes metadata too (measured: pwrite+fdatasync of a
 * 96 KB batch 0.3-0.35 ms, the same plus ONE 4-byte store through the
 * mapping 1.2-1.3 ms).  So on Linux a durable batch is framed in a private
 * buffer, written with pwrite into the same page cache the mappings show
 * (Linux's page cache is unified: readers' and the writer's mappings see the
 * bytes as soon as pwrite returns) and made durable with fdatasync; readers
 * learn about it from `published`.  Elsewhere (no such coherence promise
 * checked) the mapping + msync path stays.
 * Blocks preallocated with fallocate are "unwritten" extents: see the
 * zeroer below. */
#include <errno.h>
#include <string.h>

#if defined(__linux__)
#define ENG_LOG_PWRITE 1
#else
#define ENG_LOG_PWRITE 0
#endif

/* pwrite all of buf at off (restarts on EINTR and short writes); 0 or -1 */
static inline int eng_log_pwrite_all(int fd, const void *buf, size_t len, uint64_t off) {
    const char *p = (const char *)buf;
    while (len) {
        ssize_t n = pwrite(fd, p, len, (off_t)off);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (n == 0) { errno = EIO; return -1; }
        p += n; len -= (size_t)n; off += (uint64_t)n;
    }
    return 0;
}

/* make every written byte of fd durable: fdatasync on Linux (the pwrite
 * path exists only there); 0 or -1 */
static inline int eng_log_datasync(int fd) {
#if defined(__linux__)
    return fdatasync(fd);
#else
    return eng_log_fsync_full(fd);
#endif
}

/* ---- zeroing ahead of the tail (durable pwrite path) ------------------
 * A durable segment is preallocated with fallocate: "unwritten" extents, so
 * the fdatasync after a batch written into them also converts extents and
 * commits the journal (68 KB batches here: 176 us a sync; into blocks already
 * written: 103 us, no metadata at all).  So a plain C thread
 * (never the GIL) writes zeros over the active segment ahead of the tail,
 * `step` bytes at a time, through its own O_DIRECT descriptor, and only
 * while the appender pauses (idle_ns without a write before each step):
 * zeros written during a burst cost the burst more than they save (its
 * syncs wait for them, and they double the bytes the device writes).
 *   - O_DIRECT: the zeros never sit dirty in the page cache, where the
 *     appender's fdatasync (which writes back every dirty page of the file)
 *     would have to write them on its own path;
 *   - no sync of its own: the appender's next fdatasync commits the extent
 *     conversion once per step (the file system guarantees its data is
 *     readable after it, converted or not), and an error of the device is
 *     reported where it belongs, to the appender's own descriptor;
 *   - zeros over zeros: a segment's bytes past the tail read as zeros either
 *     way, so a crash at any point of a zero write leaves what recovery
 *     already expects, and a failed one changes nothing (the thread stops:
 *     the appender goes on into unwritten blocks, as without it).
 * It never writes where the appender writes: [done, claim) is the only range
 * in flight, claims start at or after both `done` and `wend` (everything the
 * appender declared), and the appender declares a write that reaches past
 * `done` first (eng_log_zf_enter, which waits out an overlapping claim);
 * below `done` it writes without a lock.  Only on ext4 and xfs (unwritten
 * extents; a copy-on-write file system would pay twice) and where O_DIRECT
 * opens. */
#if defined(__linux__)
#include <pthread.h>
#include <stdlib.h>
#include <sys/vfs.h>
#define ENG_LOG_ZF_HAVE 1
#else
#define ENG_LOG_ZF_HAVE 0
#endif
#define ENG_LOG_ZF_BLOCK 4096u  /* O_DIRECT alignment of offsets, lengths and the buffer */

typedef struct {
#if ENG_LOG_ZF_HAVE
    pthread_mutex_t mu;      /* guards every field but `done` reads and `failed` */
    pthread_cond_t cv;       /* thread: work or stop; appender: a claim or step ended */
    pthread_t thread;
#endif
    void *zeros;             /* ENG_LOG_ZF_BLOCK-aligned zeros, `step` bytes */
    uint64_t step;           /* most bytes one zero write covers */
    int fd;                  /* O_DIRECT descriptor of the active segment (-1: none) */
    int busy;                /* a zero write on fd is in flight */
    uint64_t size;           /* the segment's bytes */
    uint64_t done;           /* [0, done) are written blocks (atomic: the appender reads it unlocked) */
    uint64_t claim;          /* [done, claim) is being written (0: nothing in flight) */
    uint64_t wend;           /* the appender declared writes below this */
    uint64_t target;         /* zero up to here */
    uint64_t writes;         /* appender: writes so far (atomic, relaxed: only compared) */
    int quiet;               /* thread: idle_ns passed without a write or a step */
    int64_t idle_ns;         /* zero only after this long without a write */
    uint64_t bytes;          /* statistics: zeros written */
    uint32_t failed;         /* atomic: a zero write failed (errno in err); the thread returned */
    int err;
    int stop;
    int started;
} eng_log_zf;

#if ENG_LOG_ZF_HAVE
static void *eng_log_zf_main(void *arg) {
    eng_log_zf *z = (eng_log_zf *)arg;
    const uint64_t mask = ENG_LOG_ZF_BLOCK - 1;
    pthread_mutex_lock(&z->mu);
    while (!z->stop) {
        uint64_t hi = (z->target < z->size ? z->target : z->size) & ~mask;
        uint64_t lo = z->done > z->wend ? z->done : z->wend;
        lo = (lo + mask) & ~mask;  /* the block holding an unaligned end holds data: written */
        if (z->fd < 0 || lo >= hi) {
            pthread_cond_wait(&z->cv, &z->mu);
            continue;
        }
        if (!z->quiet) {
            /* each step only after a full idle_ns without a write (and none
             * since the last step): while the appender is busy, its syncs
             * would wait for this write and the device's bandwidth is its
             * own (a sync slowed by a step must not look like idle time
             * that calls for the next one) */
            uint64_t w = __atomic_load_n(&z->writes, __ATOMIC_RELAXED);
            struct timespec until;
            clock_gettime(CLOCK_MONOTONIC, &until);
            int64_t ns = until.tv_nsec + z->idle_ns;
            until.tv_sec += ns / 1000000000;
            until.tv_nsec = ns % 1000000000;
            int rc;
            do {
                rc = pthread_cond_timedwait(&z->cv, &z->mu, &until);
            } while (rc == 0 && !z->stop && z->fd >= 0 &&
                     __atomic_load_n(&z->writes, __ATOMIC_RELAXED) == w);
            z->quiet = rc == ETIMEDOUT && __atomic_load_n(&z->writes, __ATOMIC_RELAXED) == w;
            continue;
        }
        z->quiet = 0;
        if (hi - lo > z->step) hi = lo + z->step;
        int fd = z->fd;
        __atomic_store_n(&z->done, lo, __ATOMIC_RELEASE);
        z->claim = hi;
        z->busy = 1;
        pthread_mutex_unlock(&z->mu);
        int rc = eng_log_pwrite_all(fd, z->zeros, (size_t)(hi - lo), lo);
        int err = errno;
        pthread_mutex_lock(&z->mu);
        z->claim = 0;
        z->busy = 0;
        if (rc == 0) {
            /* release: the zeros are written before the appender, reading
             * `done` unlocked, writes over them */
            __atomic_store_n(&z->done, hi, __ATOMIC_RELEASE);
            z->bytes += hi - lo;
        }
        pthread_cond_broadcast(&z->cv);
        if (rc != 0) {
            z->err = err ? err : EIO;
            __atomic_store_n(&z->failed, 1, __ATOMIC_RELEASE);
            break;
        }
    }
    pthread_mutex_unlock(&z->mu);
    return NULL;
}
#endif

/* 1 where fd's file system keeps preallocated blocks as unwritten extents
 * (ext4, xfs), 0 elsewhere. */
static int eng_log_zf_fs_ok(int fd) {
#if ENG_LOG_ZF_HAVE
    struct statfs st;
    if (fstatfs(fd, &st) != 0) return 0;
    return st.f_type == 0xEF53 /* ext2/3/4 */ || st.f_type == 0x58465342 /* xfs */;
#else
    (void)fd;
    return 0;
#endif
}

/* Start the thread with `step`-byte writes, each after `idle_ns` without
 * an append; 0, or -1 (no thread: platform, memory, pthread error). */
static int eng_log_zf_start(eng_log_zf *z, uint64_t step, int64_t idle_ns) {
#if ENG_LOG_ZF_HAVE
    if (z->started) return 0;
    z->fd = -1;
    z->step = step;
    z->idle_ns = idle_ns;
    if (posix_memalign(&z->zeros, ENG_LOG_ZF_BLOCK, (size_t)step) != 0) {
        z->zeros = NULL;
        return -1;
    }
    memset(z->zeros, 0, (size_t)step);
    if (pthread_mutex_init(&z->mu, NULL) != 0) goto no_mu;
    pthread_condattr_t ca;
    if (pthread_condattr_init(&ca) != 0) goto no_cv;
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    int rc = pthread_cond_init(&z->cv, &ca);
    pthread_condattr_destroy(&ca);
    if (rc != 0) goto no_cv;
    if (pthread_create(&z->thread, NULL, eng_log_zf_main, z) != 0) goto no_thread;
    z->started = 1;
    return 0;
no_thread:
    pthread_cond_destroy(&z->cv);
no_cv:
    pthread_mutex_destroy(&z->mu);
no_mu:
    free(z->zeros);
    z->zeros = NULL;
    return -1;
#else
    (void)z; (void)step; (void)idle_ns;
    return -1;
#endif
}

/* Point the thread at another segment: O_DIRECT descriptor fd (-1: none),
 * `size` bytes, [0, done) already written.  Waits out a write in flight;
 * returns the previous descriptor (-1: none) for the caller to close. */
static int eng_log_zf_retarget(eng_log_zf *z, int fd, uint64_t size, uint64_t done) {
#if ENG_LOG_ZF_HAVE
    if (!z->started) return fd;
    pthread_mutex_lock(&z->mu);
    while (z->busy) pthread_cond_wait(&z->cv, &z->mu);
    int old = z->fd;
    z->fd = fd;
    z->size = size;
    __atomic_store_n(&z->done, done, __ATOMIC_RELEASE);
    z->wend = done;
    z->target = 0;
    pthread_mutex_unlock(&z->mu);
    return old;
#else
    (void)z; (void)size; (void)done;
    return fd;
#endif
}

/* Zero up to `target` (bytes of the segment). */
static inline void eng_log_zf_push(eng_log_zf *z, uint64_t target) {
#if ENG_LOG_ZF_HAVE
    if (!z->started) return;
    pthread_mutex_lock(&z->mu);
    if (target > z->target) {
        z->target = target;
        pthread_cond_broadcast(&z->cv);
    }
    pthread_mutex_unlock(&z->mu);
#else
    (void)z; (void)target;
#endif
}

/* Before the appender writes below `end`: returns once no zero write in
 * flight can touch those bytes, and none later will.  A load and a compare
 * while the zeros are ahead. */
static inline void eng_log_zf_enter(eng_log_zf *z, uint64_t end) {
#if ENG_LOG_ZF_HAVE
    if (!z->started) return;
    __atomic_store_n(&z->writes, z->writes + 1, __ATOMIC_RELAXED);  /* one appender at a time */
    if (end <= __atomic_load_n(&z->done, __ATOMIC_ACQUIRE)) return;
    pthread_mutex_lock(&z->mu);
    while (z->claim != 0 && end > z->done) pthread_cond_wait(&z->cv, &z->mu);
    if (end > z->wend) z->wend = end;
    pthread_mutex_unlock(&z->mu);
#else
    (void)z; (void)end;
#endif
}

/* Stop and join the thread (idempotent); returns its descriptor (-1: none)
 * for the caller to close. */
static int eng_log_zf_stop(eng_log_zf *z) {
#if ENG_LOG_ZF_HAVE
    if (!z->started) return -1;
    pthread_mutex_lock(&z->mu);
    z->stop = 1;
    pthread_cond_broadcast(&z->cv);
    pthread_mutex_unlock(&z->mu);
    pthread_join(z->thread, NULL);
    pthread_cond_destroy(&z->cv);
    pthread_mutex_destroy(&z->mu);
    free(z->zeros);
    z->zeros = NULL;
    z->started = 0;
    int fd = z->fd;
    z->fd = -1;
    return fd;
#else
    (void)z;
    return -1;
#endif
}

#endif /* ENG_LOG_LAYOUT_H */
