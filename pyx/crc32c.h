/*
 * crc32c.h -- CRC32C (Castagnoli, the iSCSI / ext4 / Kafka polynomial,
 * reflected 0x82F63B78) with three implementations:
 *
 *   - x86-64 SSE4.2 `crc32` instruction (three interleaved streams on long
 *     buffers), compiled with a per-function target attribute so the rest
 *     of the module stays baseline x86-64, used only after a runtime CPU
 *     check;
 *   - ARMv8 CRC32 instructions (`crc32cx`...), likewise;
 *   - a portable slicing-by-8 table (about 1 byte/cycle), always compiled.
 *
 * ENGINE_PORTABLE=1 compiles out both instruction paths, so CI builds and
 * tests the branch that other CPUs take.  Both paths are exposed to tests
 * (engine._log._crc32c(data, impl="hw"|"sw")).
 *
 * Convention: crc32c_update(0, data, n) is the standard CRC32C of data
 * (crc32c("123456789") == 0xE3069283); update(update(0, a), b) == crc(a + b).
 */
#ifndef ENG_CRC32C_H
#define ENG_CRC32C_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifndef ENGINE_PORTABLE
#define ENGINE_PORTABLE 0
#endif

#if !ENGINE_PORTABLE && defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ENG_CRC_X86 1
#include <nmmintrin.h>
#else
#define ENG_CRC_X86 0
#endif

#if !ENGINE_PORTABLE && defined(__aarch64__) && (defined(__GNUC__) || defined(__clang__))
#define ENG_CRC_ARM 1
#include <arm_acle.h>
#if defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_CRC32
#define HWCAP_CRC32 (1 << 7)
#endif
#endif
#else
#define ENG_CRC_ARM 0
#endif

/* ---- portable slicing-by-8 ------------------------------------------- */
static uint32_t eng_crc32c_table[8][256];
static int eng_crc32c_table_ready = 0;

static void eng_crc32c_init_table(void) {
    if (eng_crc32c_table_ready) return;
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        eng_crc32c_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = eng_crc32c_table[0][i];
        for (int t = 1; t < 8; t++) {
            c = eng_crc32c_table[0][c & 0xff] ^ (c >> 8);
            eng_crc32c_table[t][i] = c;
        }
    }
    /* Written once at module import, under the GIL, before any use. */
    eng_crc32c_table_ready = 1;
}

static uint32_t eng_crc32c_sw(uint32_t crc, const void *buf, size_t n) {
    const uint8_t *p = (const uint8_t *)buf;
    uint32_t c = ~crc;
    while (n && ((uintptr_t)p & 7)) {
        c = eng_crc32c_table[0][(c ^ *p++) & 0xff] ^ (c >> 8);
        n--;
    }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        w = __builtin_bswap64(w);
#endif
        uint32_t lo = (uint32_t)w ^ c, hi = (uint32_t)(w >> 32);
        c = eng_crc32c_table[7][lo & 0xff] ^ eng_crc32c_table[6][(lo >> 8) & 0xff] ^
            eng_crc32c_table[5][(lo >> 16) & 0xff] ^ eng_crc32c_table[4][lo >> 24] ^
            eng_crc32c_table[3][hi & 0xff] ^ eng_crc32c_table[2][(hi >> 8) & 0xff] ^
            eng_crc32c_table[1][(hi >> 16) & 0xff] ^ eng_crc32c_table[0][hi >> 24];
        p += 8;
        n -= 8;
    }
    while (n--) c = eng_crc32c_table[0][(c ^ *p++) & 0xff] ^ (c >> 8);
    return ~c;
}

/* ---- x86-64 SSE4.2 ---------------------------------------------------- */
#if ENG_CRC_X86
/* x86-64 loads need no alignment, so there is no byte-by-byte prologue: a
 * record's CRC (4-byte length word, then a multiple of 8 bytes) is one u32
 * step and u64 steps.  Below 3 * ENG_CRC_LANE bytes one stream of crc32q
 * (3-cycle latency, ~2.7 bytes/cycle) runs; above, three lanes of
 * ENG_CRC_LANE bytes run interleaved (one crc32q per cycle) and are joined
 * by a shift of each lane's CRC over the bytes after it (eng_crc32c_shift). */
#define ENG_CRC_LANE 4096

/* c(x) * x^(8 * ENG_CRC_LANE) mod P, reflected: what a CRC register holding
 * c becomes after ENG_CRC_LANE zero bytes (before the final inversion).  The
 * constant table is built at init: entry k shifts bits of byte k of c. */
static uint32_t eng_crc32c_lane_shift[4][256];

static void eng_crc32c_init_shift(void) {
    /* the shift is linear: shift each of the 32 single bits over the lane
     * bytewise (the slicing table), then XOR them into the byte tables */
    uint32_t bit[32];
    for (int b = 0; b < 32; b++) {
        uint32_t c = 1u << b;
        for (size_t n = 0; n < ENG_CRC_LANE; n++) c = eng_crc32c_table[0][c & 0xff] ^ (c >> 8);
        bit[b] = c;
    }
    for (int k = 0; k < 4; k++)
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t c = 0;
            for (int b = 0; b < 8; b++)
                if (i & (1u << b)) c ^= bit[8 * k + b];
            eng_crc32c_lane_shift[k][i] = c;
        }
}

static inline uint32_t eng_crc32c_shift(uint32_t c) {
    /* the shift is linear over GF(2): XOR the shifts of c's four bytes */
    return eng_crc32c_lane_shift[0][c & 0xff] ^ eng_crc32c_lane_shift[1][(c >> 8) & 0xff] ^
           eng_crc32c_lane_shift[2][(c >> 16) & 0xff] ^ eng_crc32c_lane_shift[3][c >> 24];
}

__attribute__((target("sse4.2")))
static uint32_t eng_crc32c_hw(uint32_t crc, const void *buf, size_t n) {
    const uint8_t *p = (const uint8_t *)buf;
    uint64_t c = (uint32_t)~crc;
    while (n >= 3 * ENG_CRC_LANE) {
        uint64_t c1 = 0, c2 = 0;
        const uint8_t *q = p, *e = p + ENG_CRC_LANE;
        for (; q < e; q += 8) {
            uint64_t w0, w1, w2;
            memcpy(&w0, q, 8);
            memcpy(&w1, q + ENG_CRC_LANE, 8);
            memcpy(&w2, q + 2 * ENG_CRC_LANE, 8);
            c = _mm_crc32_u64(c, w0);
            c1 = _mm_crc32_u64(c1, w1);
            c2 = _mm_crc32_u64(c2, w2);
        }
        /* crc(A B) = shift(crc(A), |B|) ^ crc0(B), lane by lane */
        c = eng_crc32c_shift(eng_crc32c_shift((uint32_t)c) ^ (uint32_t)c1) ^ (uint32_t)c2;
        p += 3 * ENG_CRC_LANE;
        n -= 3 * ENG_CRC_LANE;
    }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c = _mm_crc32_u64(c, w);
        p += 8;
        n -= 8;
    }
    if (n & 4) {
        uint32_t w;
        memcpy(&w, p, 4);
        c = _mm_crc32_u32((uint32_t)c, w);
        p += 4;
    }
    if (n & 2) {
        uint16_t w;
        memcpy(&w, p, 2);
        c = _mm_crc32_u16((uint32_t)c, w);
        p += 2;
    }
    if (n & 1) c = _mm_crc32_u8((uint32_t)c, *p);
    return ~(uint32_t)c;
}
static int eng_crc32c_hw_detect(void) { return __builtin_cpu_supports("sse4.2") ? 1 : 0; }

/* ---- ARMv8 CRC32 ------------------------------------------------------ */
#elif ENG_CRC_ARM
__attribute__((target("+crc")))
static uint32_t eng_crc32c_hw(uint32_t crc, const void *buf, size_t n) {
    const uint8_t *p = (const uint8_t *)buf;
    uint32_t c = ~crc;
    while (n && ((uintptr_t)p & 7)) {
        c = __crc32cb(c, *p++);
        n--;
    }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c = __crc32cd(c, w);
        p += 8;
        n -= 8;
    }
    while (n--) c = __crc32cb(c, *p++);
    return ~c;
}
static int eng_crc32c_hw_detect(void) {
#if defined(__linux__)
    return (getauxval(AT_HWCAP) & HWCAP_CRC32) ? 1 : 0;
#elif defined(__APPLE__)
    return 1; /* every Apple arm64 CPU has the CRC32 extension */
#else
    return 0;
#endif
}

#else
static uint32_t eng_crc32c_hw(uint32_t crc, const void *buf, size_t n) {
    return eng_crc32c_sw(crc, buf, n);
}
static int eng_crc32c_hw_detect(void) { return 0; }
#endif

/* Three CRC32Cs at once: out[i] = CRC32C of the 32-bit word w[i] (as its 4
 * little-endian bytes) followed by n[i] bytes at p[i].  A record's CRC has
 * this shape; one crc32q stream waits 3 cycles per 8 bytes, three
 * independent ones share those cycles, so a scan checks three records in
 * about the time of one. */
#if ENG_CRC_X86
__attribute__((target("sse4.2")))
static void eng_crc32c_word_x3_hw(const uint32_t w[3], const uint8_t *const p[3],
                                  const size_t n[3], uint32_t out[3]) {
    uint64_t c0 = _mm_crc32_u32(0xFFFFFFFFu, w[0]);
    uint64_t c1 = _mm_crc32_u32(0xFFFFFFFFu, w[1]);
    uint64_t c2 = _mm_crc32_u32(0xFFFFFFFFu, w[2]);
    size_t m = n[0] < n[1] ? n[0] : n[1];
    if (n[2] < m) m = n[2];
    m &= ~(size_t)7;
    for (size_t i = 0; i < m; i += 8) {
        uint64_t a, b, d;
        memcpy(&a, p[0] + i, 8);
        memcpy(&b, p[1] + i, 8);
        memcpy(&d, p[2] + i, 8);
        c0 = _mm_crc32_u64(c0, a);
        c1 = _mm_crc32_u64(c1, b);
        c2 = _mm_crc32_u64(c2, d);
    }
    /* the rest of the longer ones (records of unequal sizes); equal sizes,
     * the common case, need no call */
    out[0] = n[0] == m ? ~(uint32_t)c0 : eng_crc32c_hw(~(uint32_t)c0, p[0] + m, n[0] - m);
    out[1] = n[1] == m ? ~(uint32_t)c1 : eng_crc32c_hw(~(uint32_t)c1, p[1] + m, n[1] - m);
    out[2] = n[2] == m ? ~(uint32_t)c2 : eng_crc32c_hw(~(uint32_t)c2, p[2] + m, n[2] - m);
}
#endif

/* 1 when the instruction path is usable; set by eng_crc32c_init(). */
static int eng_crc32c_have_hw = 0;

/* Call once (module import) before any eng_crc32c(). */
static void eng_crc32c_init(void) {
    eng_crc32c_init_table();
#if ENG_CRC_X86
    eng_crc32c_init_shift();
#endif
    eng_crc32c_have_hw = eng_crc32c_hw_detect();
}

static inline uint32_t eng_crc32c(uint32_t crc, const void *buf, size_t n) {
    return eng_crc32c_have_hw ? eng_crc32c_hw(crc, buf, n) : eng_crc32c_sw(crc, buf, n);
}

static inline void eng_crc32c_word_x3(const uint32_t w[3], const uint8_t *const p[3],
                                      const size_t n[3], uint32_t out[3]) {
#if ENG_CRC_X86
    if (eng_crc32c_have_hw) {
        eng_crc32c_word_x3_hw(w, p, n, out);
        return;
    }
#endif
    for (int i = 0; i < 3; i++) {
        out[i] = eng_crc32c(eng_crc32c(0, &w[i], 4), p[i], n[i]);
    }
}

#endif /* ENG_CRC32C_H */
