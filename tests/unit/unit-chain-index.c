/*
 * The chain allocation index (src/image/chain-index.c) against a model.
 *
 * Random chains (2 to 9 layers; qcow2 layers with 512 B to 64 KiB clusters, extended L2 or
 * not, v2 or v3, a raw or qcow2 base; layers of different sizes, so that shorter layers hide
 * what lies below) get random data and zero writes in every layer. The chain is then read
 * through its top at random offsets and lengths and compared with a model that resolves each
 * byte to the topmost layer deciding it. Then, with the chain open (and its index learnt),
 * middle layers are reopened read-write, written and made read-only again, the top is
 * written: every read must follow (X1). Last, a middle layer is compacted after the index has
 * learnt where its data lies: reads that go straight to a layer's file must follow the data
 * it moves (X4).
 *
 * usage: unit-chain-index [SEEDS]   (default 30; COWTREE_TEST_LONG=1: 300)
 */
#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cowtree/cowtree.h"

#define MAXL         9
#define MAX_READ     (256u << 10) /* reads of 1 byte to 256 KiB, each checked byte by byte */
#define CT_MIN(a, b) ((a) < (b) ? (a) : (b))
#define CT_MAX(a, b) ((a) > (b) ? (a) : (b))

struct layer {
    uint64_t unit; /* allocation unit (cluster, or subcluster with extended L2); 0 for raw */
    uint64_t size;
    uint8_t *data; /* what the layer stores where written */
    uint8_t *set;  /* 1 where the layer decides the byte */
};

static unsigned long long rng_state;
static uint64_t rnd(void)
{
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return rng_state >> 17;
}
static uint64_t below(uint64_t n)
{
    return n ? rnd() % n : 0;
}

static uint64_t last_off, last_len; /* the last write, read back first by verify */
static unsigned zero_flags;         /* flags of write_layer's zero writes */
static int failures;
static uint64_t moved_total; /* clusters compaction moved, over all seeds */
#define FAIL(...)                                                                                  \
    do {                                                                                           \
        fprintf(stderr, "FAIL: " __VA_ARGS__);                                                     \
        fputc('\n', stderr);                                                                       \
        failures++;                                                                                \
    } while (0)

/* Model: the byte at off as layers[top..] show it. */
static uint8_t model_byte(struct layer *L, int top, int n, uint64_t off)
{
    for (int i = top; i < n; i++) {
        if (off >= L[i].size) {
            return 0; /* past this layer's end: zeros, whatever lies below */
        }
        if (L[i].set[off]) {
            return L[i].data[off];
        }
    }
    return 0;
}

static void model_write(struct layer *l, uint64_t off, uint64_t len, int pat)
{
    memset(l->data + off, pat, len);
    memset(l->set + off, 1, len);
}

/* Align a random range to the layer's write granularity (512 B) inside its size. */
static void pick_range(uint64_t size, uint64_t *off, uint64_t *len)
{
    uint64_t sectors = size / 512;
    uint64_t s = below(sectors);
    uint64_t n = 1 + below(CT_MIN(sectors - s, 300));
    *off = s * 512;
    *len = n * 512;
}

/* whole: 64 KiB-aligned (whole clusters and subclusters of every layer), so that no partial
 * cluster copies from below: the model need not know what a write's copy-on-write took. */
/* A write of [off, off+len) into layer i allocates whole units: the rest of each unit is
 * copied from what the layers below show now (copy-on-write), and decided by i from then on. */
static void model_cow(struct layer *L, int i, int n, uint64_t off, uint64_t len)
{
    uint64_t u = L[i].unit;
    if (!u) {
        return;
    }
    uint64_t a = off / u * u, b = CT_MIN((off + len + u - 1) / u * u, L[i].size);
    for (uint64_t p = a; p < b; p++) {
        if ((p < off || p >= off + len) && !L[i].set[p]) {
            L[i].data[p] = model_byte(L, i + 1, n, p);
            L[i].set[p] = 1;
        }
    }
}

static int write_layer(struct ct_image *img, struct layer *L, int i, int n, int zero, bool whole)
{
    struct layer *l = &L[i];
    uint64_t off, len;
    pick_range(l->size, &off, &len);
    /* (Zero writes whole units too: a partial one may stay unallocated where the chain below
     * reads zero now, and show what a later write below puts there.) */
    if (whole || zero) {
        off &= ~65535ull;
        len = (len + 65535) & ~65535ull;
        if (off + len > (l->size & ~65535ull)) {
            return 0;
        }
    }
    int pat = 1 + (int)below(255);
    int r;
    if (zero) {
        r = ct_image_pwrite_zeroes(img, len, off, zero_flags);
        pat = 0;
    } else {
        uint8_t *buf = malloc(len);
        memset(buf, pat, len);
        r = ct_image_pwrite(img, buf, len, off, 0);
        free(buf);
    }
    last_off = off;
    last_len = len;
    if (r == 0) {
        model_cow(L, i, n, off, len);
        model_write(l, off, len, pat);
    }
    return r;
}

static void verify(struct ct_image *top, struct layer *L, int n, int reads, const char *when,
                   unsigned seed)
{
    uint64_t size = L[0].size;
    uint8_t *buf = malloc(MAX_READ);
    for (int k = 0; k < reads; k++) {
        uint64_t off = below(size);
        uint64_t len = 1 + below(CT_MIN(size - off, (uint64_t)MAX_READ));
        if (k == 0 && last_len && last_off < size) {
            off = last_off;
            len = CT_MIN(CT_MIN(last_len, size - off), (uint64_t)MAX_READ);
        }
        if (k % 4 == 0) { /* sector-aligned reads as guests make them */
            off &= ~511ull;
            len = CT_MAX(len & ~511ull, 512);
            if (off + len > size) {
                len = size - off;
            }
        }
        int r = ct_image_pread(top, buf, len, off);
        if (r < 0) {
            FAIL("seed %u %s: read %" PRIu64 "+%" PRIu64 ": %s", seed, when, off, len,
                 ct_strerror(r));
            break;
        }
        for (uint64_t i = 0; i < len; i++) {
            uint8_t want = model_byte(L, 0, n, off + i);
            if (buf[i] != want) {
                FAIL("seed %u %s: byte %" PRIu64 " reads 0x%02x, the model says 0x%02x", seed, when,
                     off + i, buf[i], want);
                k = reads;
                break;
            }
        }
    }
    free(buf);
}

/* Free clusters in a backing qcow2 v3 layer (zero writes that unmap), let the
 * index learn the layer's data where it lies, then compact the layer, moving data clusters
 * into the holes: every read must follow (X4). */
static void compact_middle(struct ct_image *top, struct layer *L, int n, unsigned seed)
{
    struct ct_err err = {0};
    int i = 1 + (int)below(n - 1);
    struct ct_image *l = top;
    for (int k = 0; k < i; k++) {
        l = ct_image_backing(l);
    }
    struct ct_image_info info;
    if (!l || strcmp(ct_image_format(l), "qcow2") || ct_image_info(l, &info) < 0 ||
        info.version < 3) {
        return;
    }
    if (ct_image_reopen(l, true, &err) < 0) {
        FAIL("seed %u: reopen of layer %d read-write: %s", seed, i, err.msg);
        return;
    }
    /* Fill the layer's first half so that there is data to move, then hole its start. */
    for (int w = 0; w < 4; w++) {
        write_layer(l, L, i, n, 0, true);
    }
    zero_flags = CT_WRITE_UNMAP;
    for (int w = 0; w < 4; w++) {
        write_layer(l, L, i, n, 1, true);
    }
    zero_flags = 0;
    uint8_t *all = malloc(L[0].size);
    if (all && ct_image_pread(top, all, L[0].size, 0) < 0) {
        FAIL("seed %u: reading the whole top failed", seed);
    }
    free(all);
    last_len = 0;
    struct ct_compact_result res;
    if (ct_image_compact(l, &res, &err) < 0) {
        FAIL("seed %u: compacting layer %d: %s", seed, i, err.msg);
    }
    if (getenv("CT_VERBOSE")) {
        fprintf(stderr, "seed %u: compaction of layer %d moved %llu clusters\n", seed, i,
                (unsigned long long)res.clusters_moved);
    }
    moved_total += res.clusters_moved;
    verify(top, L, n, 40, "after compacting a middle layer", seed);
    if (ct_image_reopen(l, false, &err) < 0) {
        FAIL("seed %u: reopen read-only: %s", seed, err.msg);
    }
}

static void one_seed(unsigned seed, const char *dir)
{
    rng_state = seed * 2654435761ull + 1;
    int n = 2 + (int)below(MAXL - 1);
    struct layer L[MAXL];
    char path[MAXL][512];
    struct ct_err err = {0};
    uint64_t top_size = (1 + below(8)) << 20;
    /* Layer sizes: mostly the top's, sometimes shorter (hiding what lies below) or longer. */
    for (int i = 0; i < n; i++) {
        uint64_t s = top_size;
        if (i > 0 && below(4) == 0) {
            s = (below(top_size / 512) + 1) * 512;
        } else if (i > 0 && below(6) == 0) {
            s = top_size + (below(64) + 1) * 65536;
        }
        L[i].size = s;
        L[i].data = calloc(1, s);
        L[i].set = calloc(1, s);
        snprintf(path[i], sizeof(path[i]), "%s/l%d-%u.img", dir, i, seed);
    }
    static const unsigned cs[] = {512, 4096, 16384, 65536, 65536};
    /* Create base first, then each overlay on the one below, writing as we go. */
    for (int i = n - 1; i >= 0; i--) {
        bool raw = i == n - 1 && below(3) == 0;
        struct ct_create_opts co = {.format = raw ? "raw" : "qcow2",
                                    .size = L[i].size,
                                    .size_given = true,
                                    .cluster_size = cs[below(5)],
                                    .compat = below(4) ? 3 : 2,
                                    .no_open_backing = true};
        co.extended_l2 = co.compat == 3 && co.cluster_size >= 16384 && below(3) == 0;
        L[i].unit = raw ? 0 : co.extended_l2 ? co.cluster_size / 32 : co.cluster_size;
        if (i < n - 1) {
            /* the layer below, with its format */
            co.backing_file = path[i + 1];
            struct ct_image *probe;
            struct ct_open_opts po = {.flags = CT_OPEN_NO_BACKING | CT_OPEN_FORCE_SHARE};
            if (ct_image_open(&probe, path[i + 1], &po, &err) < 0) {
                FAIL("seed %u: %s", seed, err.msg);
                goto out;
            }
            co.backing_format = strcmp(ct_image_format(probe), "raw") ? "qcow2" : "raw";
            ct_image_close(probe, NULL);
        }
        if (getenv("CT_VERBOSE")) {
            fprintf(stderr, "seed %u layer %d: %s size %" PRIu64 " cluster %u v%d%s\n", seed, i,
                    co.format, L[i].size, co.cluster_size, co.compat,
                    co.extended_l2 ? " extl2" : "");
        }
        if (ct_image_create(path[i], &co, &err) < 0) {
            FAIL("seed %u: create %s: %s", seed, path[i], err.msg);
            goto out;
        }
        struct ct_image *img;
        /* With its backing chain: a partial-cluster write copies the rest from below. */
        struct ct_open_opts oo = {.flags = CT_OPEN_WRITE};
        if (ct_image_open(&img, path[i], &oo, &err) < 0) {
            FAIL("seed %u: open %s: %s", seed, path[i], err.msg);
            goto out;
        }
        int writes = (int)below(40);
        for (int w = 0; w < writes; w++) {
            /* (zero writes only where the layer has a backing to hide: v2 may leave holes) */
            if (write_layer(img, L, i, n, i < n - 1 && co.compat == 3 && below(5) == 0, false) <
                0) {
                FAIL("seed %u: write into layer %d failed", seed, i);
            }
        }
        ct_image_close(img, NULL);
    }
    struct ct_image *top;
    struct ct_open_opts oo = {.flags = CT_OPEN_WRITE};
    if (ct_image_open(&top, path[0], &oo, &err) < 0) {
        FAIL("seed %u: open top: %s", seed, err.msg);
        goto out;
    }
    verify(top, L, n, 60, "fresh chain", seed);
    verify(top, L, n, 30, "second pass (learnt index)", seed);

    /* Writes into middle layers through the open chain (as live commit does into its base). */
    for (int round = 0; round < 3 && n > 2; round++) {
        int i = 1 + (int)below(n - 1);
        struct ct_image *l = top;
        for (int k = 0; k < i; k++) {
            l = ct_image_backing(l);
        }
        if (!strcmp(ct_image_format(l), "raw")) {
            continue;
        }
        if (ct_image_reopen(l, true, &err) < 0) {
            FAIL("seed %u: reopen of layer %d read-write: %s", seed, i, err.msg);
            continue;
        }
        /* Read everything through the top once, so that every granule's entry is learnt
         * before the writes below must make it stale. */
        uint8_t *all = malloc(L[0].size);
        if (all && ct_image_pread(top, all, L[0].size, 0) < 0) {
            FAIL("seed %u: reading the whole top failed", seed);
        }
        free(all);
        for (int w = 0; w < 5; w++) {
            if (write_layer(l, L, i, n, 0, true) < 0) {
                FAIL("seed %u: write into reopened layer %d failed", seed, i);
            }
            if (getenv("CT_VERBOSE")) {
                fprintf(stderr, "seed %u: wrote layer %d at %llu+%llu\n", seed, i,
                        (unsigned long long)last_off, (unsigned long long)last_len);
            }
            /* Read through the top while the layer is writable (live commit does this). */
            verify(top, L, n, 20, "between writes into a writable middle layer", seed);
        }
        if (ct_image_reopen(l, false, &err) < 0) {
            FAIL("seed %u: reopen read-only: %s", seed, err.msg);
        }
        verify(top, L, n, 30, "after writing a middle layer", seed);
    }
    compact_middle(top, L, n, seed);
    /* Writes into the top do not disturb the index. */
    for (int w = 0; w < 10; w++) {
        write_layer(top, L, 0, n, below(4) == 0, false);
    }
    verify(top, L, n, 30, "after writing the top", seed);
    ct_image_close(top, NULL);
out:
    for (int i = 0; i < n; i++) {
        free(L[i].data);
        free(L[i].set);
    }
    for (int i = 0; i < MAXL && !getenv("CT_KEEP"); i++) {
        unlink(path[i]);
    }
}

int main(int argc, char **argv)
{
    /* (tests/run.sh always sets COWTREE_TEST_LONG, to 0 or 1) */
    const char *lg = getenv("COWTREE_TEST_LONG");
    unsigned seeds = argc > 1 ? (unsigned)atoi(argv[1]) : lg && *lg == '1' ? 300 : 30;
    char dir[] = "/tmp/ct-chain-index.XXXXXX";
    const char *tmp = getenv("TMPDIR");
    char tdir[4096];
    if (tmp) {
        snprintf(tdir, sizeof(tdir), "%s/ct-chain-index.XXXXXX", tmp);
    }
    char *d = mkdtemp(tmp ? tdir : dir);
    if (!d) {
        perror("mkdtemp");
        return 1;
    }
    for (unsigned s = 1; s <= seeds && failures < 5; s++) {
        one_seed(s, d);
    }
    rmdir(d);
    printf("%u seeds, %d failures, %llu clusters moved by compaction\n", seeds, failures,
           (unsigned long long)moved_total);
    if (moved_total == 0) {
        FAIL("no seed's compaction moved a cluster: the X4 checks tested nothing");
    }
    return failures ? 1 : 0;
}
