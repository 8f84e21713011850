/* CRC32C (Castagnoli), reflected, as iSCSI/ext4/LevelDB and the Python crc32c
 * package compute it. A hardware path (SSE4.2 on x86-64, the ARMv8 CRC
 * extension on aarch64) is chosen at run time; the software fallback is
 * slicing-by-8 and gives the same results everywhere. */
#include <stdint.h>
#include <string.h>

#include "wal.h"

#define POLY 0x82f63b78u

static uint32_t table[8][256];
static int table_ready;

static void make_tables(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (POLY & (0u - (c & 1u)));
        table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            table[t][i] = (table[t - 1][i] >> 8) ^ table[0][table[t - 1][i] & 0xff];
    __atomic_store_n(&table_ready, 1, __ATOMIC_RELEASE);
}

/* Software CRC32C on the raw (non-inverted) register. */
static uint32_t crc_sw(uint32_t c, const uint8_t *p, size_t n)
{
    if (!__atomic_load_n(&table_ready, __ATOMIC_ACQUIRE))
        make_tables(); /* idempotent: a race computes the same table twice */
    while (n && ((uintptr_t)p & 7)) {
        c = table[0][(c ^ *p++) & 0xff] ^ (c >> 8);
        n--;
    }
    while (n >= 8) {
        uint32_t lo, hi;
        memcpy(&lo, p, 4);
        memcpy(&hi, p + 4, 4);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        lo = __builtin_bswap32(lo);
        hi = __builtin_bswap32(hi);
#endif
        lo ^= c;
        c = table[7][lo & 0xff] ^ table[6][(lo >> 8) & 0xff] ^ table[5][(lo >> 16) & 0xff] ^
            table[4][lo >> 24] ^ table[3][hi & 0xff] ^ table[2][(hi >> 8) & 0xff] ^
            table[1][(hi >> 16) & 0xff] ^ table[0][hi >> 24];
        p += 8;
        n -= 8;
    }
    while (n--)
        c = table[0][(c ^ *p++) & 0xff] ^ (c >> 8);
    return c;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <nmmintrin.h>
#define HAVE_HW 1
__attribute__((target("sse4.2"))) static uint32_t crc_hw(uint32_t c, const uint8_t *p, size_t n)
{
    while (n && ((uintptr_t)p & 7)) {
        c = _mm_crc32_u8(c, *p++);
        n--;
    }
    uint64_t c64 = c;
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c64 = _mm_crc32_u64(c64, v);
        p += 8;
        n -= 8;
    }
    c = (uint32_t)c64;
    while (n--)
        c = _mm_crc32_u8(c, *p++);
    return c;
}
static int detect_hw(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("sse4.2") != 0;
}
#elif defined(__aarch64__) && defined(__GNUC__)
#include <sys/auxv.h>
#ifndef HWCAP_CRC32
#define HWCAP_CRC32 (1 << 7)
#endif
#define HAVE_HW 1
__attribute__((target("+crc"))) static uint32_t crc_hw(uint32_t c, const uint8_t *p, size_t n)
{
    while (n && ((uintptr_t)p & 7)) {
        c = __builtin_aarch64_crc32cb(c, *p++);
        n--;
    }
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = __builtin_aarch64_crc32cx(c, v);
        p += 8;
        n -= 8;
    }
    while (n--)
        c = __builtin_aarch64_crc32cb(c, *p++);
    return c;
}
static int detect_hw(void)
{
    return (getauxval(AT_HWCAP) & HWCAP_CRC32) != 0;
}
#else
#define HAVE_HW 0
#endif

/* -1 unknown, 0 software, 1 hardware. WALSTATE_CRC32C_SW=1 forces software
 * (lets the tests cover the fallback on a machine that has the instructions). */
static int use_hw = -1;

#include <stdlib.h>
static int pick(void)
{
    int v = 0;
#if HAVE_HW
    const char *force = getenv("WALSTATE_CRC32C_SW");
    v = (force && *force == '1') ? 0 : detect_hw();
#endif
    __atomic_store_n(&use_hw, v, __ATOMIC_RELEASE);
    return v;
}

int wal_crc32c_hw(void)
{
    int v = __atomic_load_n(&use_hw, __ATOMIC_ACQUIRE);
    return v < 0 ? pick() : v;
}

uint32_t wal_crc32c(uint32_t crc, const void *buf, size_t len)
{
    uint32_t c = ~crc;
#if HAVE_HW
    if (wal_crc32c_hw())
        return ~crc_hw(c, (const uint8_t *)buf, len);
#endif
    return ~crc_sw(c, (const uint8_t *)buf, len);
}
