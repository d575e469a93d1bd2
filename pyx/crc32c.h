/*
 * crc32c.h -- CRC32C (Castagnoli, the iSCSI / ext4 / Kafka polynomial,
 * reflected 0x82F63B78) with three implementations:
 *
 *   - x86-64 SSE4.2 `crc32` instruction, compiled with a per-function target
 *     attribute so the rest of the module stays baseline x86-64, used only
 *     after a runtime CPU check;
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
__attribute__((target("sse4.2")))
static uint32_t eng_crc32c_hw(uint32_t crc, const void *buf, size_t n) {
    const uint8_t *p = (const uint8_t *)buf;
    uint64_t c = (uint32_t)~crc;
    while (n && ((uintptr_t)p & 7)) {
        c = _mm_crc32_u8((uint32_t)c, *p++);
        n--;
    }
    /* Three independent streams would hide the 3-cycle latency; one stream
     * already runs at ~8 GB/s, well above what the log needs. */
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c = _mm_crc32_u64(c, w);
        p += 8;
        n -= 8;
    }
    while (n--) c = _mm_crc32_u8((uint32_t)c, *p++);
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

/* 1 when the instruction path is usable; set by eng_crc32c_init(). */
static int eng_crc32c_have_hw = 0;

/* Call once (module import) before any eng_crc32c(). */
static void eng_crc32c_init(void) {
    eng_crc32c_init_table();
    eng_crc32c_have_hw = eng_crc32c_hw_detect();
}

static inline uint32_t eng_crc32c(uint32_t crc, const void *buf, size_t n) {
    return eng_crc32c_have_hw ? eng_crc32c_hw(crc, buf, n) : eng_crc32c_sw(crc, buf, n);
}

#endif /* ENG_CRC32C_H */
