# Cython view of crc32c.h: CRC32C with hardware (SSE4.2 / ARMv8) and portable paths.
# Pure C that cannot fail, hence noexcept.
from libc.stdint cimport uint8_t, uint32_t

cdef extern from "crc32c.h" nogil:
    int eng_crc32c_have_hw             # 1 after eng_crc32c_init() found the instruction
    int ENG_CRC_X86                    # 1 when the SSE4.2 path is compiled in
    int ENG_CRC_ARM                    # 1 when the ARMv8 CRC path is compiled in

    void eng_crc32c_init() noexcept
    uint32_t eng_crc32c(uint32_t crc, const void *buf, size_t n) noexcept
    uint32_t eng_crc32c_hw(uint32_t crc, const void *buf, size_t n) noexcept
    uint32_t eng_crc32c_sw(uint32_t crc, const void *buf, size_t n) noexcept
    void eng_crc32c_word_x3(const uint32_t *w, const uint8_t *const *p, const size_t *n,
                            uint32_t *out) noexcept
