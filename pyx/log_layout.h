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
#define ENG_REC_FLAGS_KNOWN 7u

/* attr byte of an inner record of a batch frame */
#define ENG_INNER_KEY 1u              /* a key (possibly empty) precedes the value */
#define ENG_INNER_TOMBSTONE 2u        /* reserved for key compaction: a deleted key (value empty) */
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
 * Blocks preallocated with fallocate are "unwritten" extents whose first
 * write makes fdatasync update the extent tree too: pwrite+fdatasync of 96 KB
 * into written (zeroed) blocks 0.35 ms, into fallocated ones 0.6 ms.  Zeroing
 * in line (eng_log_zero_fill ahead of the tail) costs more bandwidth than it
 * saves, so it is off (engine._log._set_zero_ahead).  Zeroing in a background
 * thread does not help either while the writer is busy (measured: 0.57-0.94x
 * of os.write+fdatasync; its writes and syncs compete for the same device):
 * only blocks zeroed *before* the burst give the 0.35 ms. */
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

/* write zeros over [off, off + len): turns preallocated (unwritten) blocks
 * into written ones; 0 or -1 */
static inline int eng_log_zero_fill(int fd, uint64_t off, size_t len) {
    static const char zeros[65536];
    while (len) {
        size_t n = len < sizeof(zeros) ? len : sizeof(zeros);
        if (eng_log_pwrite_all(fd, zeros, n, off) != 0) return -1;
        off += n; len -= n;
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

#endif /* ENG_LOG_LAYOUT_H */
