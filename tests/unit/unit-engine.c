/*
 * Engine stress test against a shadow buffer: random writes, zero writes, discards, flushes
 * and reopens on images of every refcount width, small and large clusters, v2/v3 and
 * extended L2, with a metadata cache far smaller than the metadata (so every eviction path
 * runs), then a check that must find no leak and no corruption.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cowtree/cowtree.h"
#include "t.h"

struct cfg {
    int compat;
    unsigned cluster, refbits;
    bool extl2;
    uint64_t size;
};

static uint64_t rng_state;
static uint64_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static struct ct_image *open_img(const char *path)
{
    struct ct_image *img = NULL;
    struct ct_err err = {0};
    struct ct_open_opts o = {.flags = CT_OPEN_WRITE, .cache_bytes = 1};
    int r = ct_image_open(&img, path, &o, &err);
    T_ASSERT(r == 0, "open %s: %s", path, err.msg);
    return img;
}

static void verify(struct ct_image *img, const uint8_t *shadow, uint64_t size, const char *when)
{
    uint8_t *buf = malloc(size);
    int r = ct_image_pread(img, buf, size, 0);
    T_ASSERT(r == 0, "read back (%s): %s", when, ct_strerror(r));
    uint64_t i = 0;
    while (i < size && buf[i] == shadow[i]) {
        i++;
    }
    T_CHECK(i == size, "content differs at %llu (%s): got 0x%02x want 0x%02x",
            (unsigned long long)i, when, i < size ? buf[i] : 0, i < size ? shadow[i] : 0);
    free(buf);
}

static void run(const struct cfg *c, unsigned seed)
{
    char path[] = "/tmp/ct-unit-XXXXXX";
    int fd = mkstemp(path);
    T_ASSERT(fd >= 0, "mkstemp");
    close(fd);
    struct ct_create_opts co = {.format = "qcow2",
                                .size = c->size,
                                .size_given = true,
                                .cluster_size = c->cluster,
                                .compat = c->compat,
                                .refcount_bits = c->refbits,
                                .extended_l2 = c->extl2};
    struct ct_err err = {0};
    int r = ct_image_create(path, &co, &err);
    T_ASSERT(r == 0, "create: %s", err.msg);
    uint8_t *shadow = calloc(1, c->size), *buf = malloc(1 << 20);
    struct ct_image *img = open_img(path);
    rng_state = 0x9e3779b97f4a7c15ull ^ seed;
    for (int op = 0; op < 400; op++) {
        uint64_t kind = rnd() % 100;
        uint64_t maxlen = (rnd() % 4 == 0) ? (1 << 20) : 3 * c->cluster;
        uint64_t len = 1 + rnd() % maxlen;
        uint64_t off = rnd() % c->size;
        if (off + len > c->size) {
            len = c->size - off;
        }
        if (kind < 60) {
            uint8_t pat = (uint8_t)(1 + rnd() % 250);
            memset(buf, pat, len);
            r = ct_image_pwrite(img, buf, len, off, 0);
            T_ASSERT(r == 0, "write %llu+%llu: %s", (unsigned long long)off,
                     (unsigned long long)len, ct_strerror(r));
            memset(shadow + off, pat, len);
        } else if (kind < 75) {
            r = ct_image_pwrite_zeroes(img, len, off, 0);
            T_ASSERT(r == 0, "zero: %s", ct_strerror(r));
            memset(shadow + off, 0, len);
        } else if (kind < 88) {
            r = ct_image_discard(img, len, off);
            T_ASSERT(r == 0, "discard: %s", ct_strerror(r));
            /* Whole clusters only (and a cluster-aligned tail at the end of the image). */
            uint64_t a = (off + c->cluster - 1) / c->cluster * c->cluster;
            uint64_t e = off + len;
            uint64_t b = e == c->size ? e : e / c->cluster * c->cluster;
            if (a < b) {
                memset(shadow + a, 0, b - a);
            }
        } else if (kind < 95) {
            T_ASSERT(ct_image_flush(img) == 0, "flush");
        } else {
            T_ASSERT(ct_image_close(img, &err) == 0, "close: %s", err.msg);
            img = open_img(path);
            verify(img, shadow, c->size, "after reopen");
        }
    }
    verify(img, shadow, c->size, "end");
    T_ASSERT(ct_image_close(img, &err) == 0, "close: %s", err.msg);
    struct ct_open_opts ro = {.flags = 0};
    r = ct_image_open(&img, path, &ro, &err);
    T_ASSERT(r == 0, "reopen: %s", err.msg);
    struct ct_check_result res;
    r = ct_image_check(img, CT_FIX_NONE, &res, NULL, NULL, &err);
    T_CHECK(r == 0 && res.corruptions == 0 && res.leaks == 0 && res.check_errors == 0,
            "check (compat %d, cluster %u, refbits %u, extl2 %d, seed %u): r=%d corruptions=%llu "
            "leaks=%llu",
            c->compat, c->cluster, c->refbits, c->extl2, seed, r,
            (unsigned long long)res.corruptions, (unsigned long long)res.leaks);
    verify(img, shadow, c->size, "read-only reopen");
    ct_image_close(img, NULL);
    unlink(path);
    free(shadow);
    free(buf);
}

int main(void)
{
    static const struct cfg cfgs[] = {
        {3, 65536, 16, false, 64 << 20}, {2, 65536, 16, false, 64 << 20},
        {3, 512, 16, false, 8 << 20},    {3, 512, 1, false, 8 << 20},
        {3, 512, 64, false, 8 << 20},    {3, 4096, 2, false, 16 << 20},
        {3, 4096, 8, false, 16 << 20},   {3, 16384, 32, true, 32 << 20},
        {3, 65536, 4, true, 64 << 20},   {2, 1024, 16, false, 8 << 20},
    };
    const char *longrun = getenv("COWTREE_TEST_LONG");
    unsigned seeds = longrun && *longrun == '1' ? 12 : 2;
    for (size_t i = 0; i < sizeof(cfgs) / sizeof(cfgs[0]); i++) {
        for (unsigned seed = 1; seed <= seeds; seed++) {
            run(&cfgs[i], seed * 7919 + (unsigned)i);
        }
    }
    return t_done();
}
