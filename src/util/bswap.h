/* Big-endian load/store helpers for on-disk structures (qcow2 is big-endian throughout). */
#ifndef CT_UTIL_BSWAP_H
#define CT_UTIL_BSWAP_H

#include <endian.h>
#include <stdint.h>
#include <string.h>

static inline uint16_t ld_be16(const void *p)
{
    uint16_t v;
    memcpy(&v, p, sizeof(v));
    return be16toh(v);
}
static inline uint32_t ld_be32(const void *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof(v));
    return be32toh(v);
}
static inline uint64_t ld_be64(const void *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof(v));
    return be64toh(v);
}
static inline void st_be16(void *p, uint16_t v)
{
    v = htobe16(v);
    memcpy(p, &v, sizeof(v));
}
static inline void st_be32(void *p, uint32_t v)
{
    v = htobe32(v);
    memcpy(p, &v, sizeof(v));
}
static inline void st_be64(void *p, uint64_t v)
{
    v = htobe64(v);
    memcpy(p, &v, sizeof(v));
}

#endif
