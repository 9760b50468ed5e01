/* Small arithmetic helpers shared by every layer. */
#ifndef CT_UTIL_MISC_H
#define CT_UTIL_MISC_H

#include <stdint.h>

#define CT_MIN(a, b)     ((a) < (b) ? (a) : (b))
#define CT_MAX(a, b)     ((a) > (b) ? (a) : (b))
#define CT_ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

static inline uint64_t ct_align_down(uint64_t v, uint64_t a)
{
    return v & ~(a - 1);
}
static inline uint64_t ct_align_up(uint64_t v, uint64_t a)
{
    return (v + a - 1) & ~(a - 1);
}
static inline uint64_t ct_div_round_up(uint64_t v, uint64_t d)
{
    return (v + d - 1) / d;
}

#endif
