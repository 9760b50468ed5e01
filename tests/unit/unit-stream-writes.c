/*
 * Stream and commit with writes in flight (src/job/pipe.c) and with a guest writing between
 * the job's requests (the I/O lock of cowtreed).
 *
 *  1. Guest writes at pause points: a stream job runs with io_lock/io_unlock callbacks, as in
 *     cowtreed; every time it lets go of the lock, the "guest" writes a 4 KiB pattern into
 *     the top at offsets ahead of the job and behind it. Afterwards every guest write reads
 *     back, and every other byte is what the backing chain held (S1: the job only fills what
 *     the top still does not allocate).
 *  2. Offline (threaded writer): stream and commit of random chains (random cluster sizes,
 *     data and zero clusters in every layer) read exactly as the chain did before, compared
 *     byte by byte with a model.
 *  3. A write failure in the writer (fault injection at the K-th write) fails the job with
 *     the writer's message, for K over the first writes of the job; the images stay readable.
 *
 * usage: unit-stream-writes [SEEDS]   (default 12; COWTREE_TEST_LONG=1: 60)
 */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cowtree/cowtree.h"
#include "cowtree/job.h"
#include "t.h"

#define MiB  (1ull << 20)
#define SIZE (24 * MiB)

static char dir[] = "/tmp/ct-unit-stream-XXXXXX";
static unsigned long long rng;
static uint64_t rnd(void)
{
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    return rng >> 17;
}

static char *path(const char *name)
{
    static char p[4][256];
    static int k;
    k = (k + 1) % 4;
    snprintf(p[k], sizeof(p[k]), "%s/%s", dir, name);
    return p[k];
}

static void create(const char *name, const char *backing, unsigned cluster)
{
    struct ct_create_opts o = {
        .format = "qcow2", .size = SIZE, .size_given = true, .cluster_size = cluster};
    if (backing) {
        o.backing_file = backing;
        o.backing_format = "qcow2";
    }
    struct ct_err err = {0};
    T_ASSERT(ct_image_create(path(name), &o, &err) == 0, "create %s: %s", name, err.msg);
}

static struct ct_image *open_rw(const char *name, unsigned flags)
{
    struct ct_open_opts o = {.format = "qcow2", .flags = CT_OPEN_WRITE | flags};
    struct ct_image *img;
    struct ct_err err = {0};
    T_ASSERT(ct_image_open(&img, path(name), &o, &err) == 0, "open %s: %s", name, err.msg);
    return img;
}

/* Fill layer img with random data and zero extents (1 KiB..1 MiB), recorded in model when
 * given (the model is the top's view, updated as if img were on top of what it holds). */
static void scribble(struct ct_image *img, uint8_t *model, unsigned n)
{
    uint8_t *buf = malloc(MiB);
    for (unsigned i = 0; i < n; i++) {
        uint64_t len = (1 + rnd() % 1024) * 1024;
        uint64_t off = (rnd() % ((SIZE - len) / 512)) * 512;
        if (rnd() % 4 == 0) {
            T_ASSERT(ct_image_pwrite_zeroes(img, len, off, 0) == 0, "zero write");
            memset(model + off, 0, len);
        } else {
            memset(buf, (int)(1 + rnd() % 250), len);
            T_ASSERT(ct_image_pwrite(img, buf, len, off, 0) == 0, "write");
            memcpy(model + off, buf, len);
        }
    }
    free(buf);
}

static void expect(struct ct_image *img, const uint8_t *model, const char *what)
{
    uint8_t *buf = malloc(MiB);
    for (uint64_t off = 0; off < SIZE; off += MiB) {
        T_ASSERT(ct_image_pread(img, buf, MiB, off) == 0, "%s: read", what);
        if (memcmp(buf, model + off, MiB) != 0) {
            uint64_t i = 0;
            while (buf[i] == model[off + i]) {
                i++;
            }
            T_CHECK(0, "%s: byte %llu is %u, want %u", what, (unsigned long long)(off + i), buf[i],
                    model[off + i]);
            break;
        }
    }
    free(buf);
}

/* ---- 1. guest writes while the job waits at a pause point ---- */

struct guest {
    struct ct_image *top;
    uint8_t *model;
    struct ct_job *job;
    unsigned writes;
};

static void g_lock(void *opaque)
{
    (void)opaque;
}

/* The job lets go of the images: a guest request runs now. */
static void g_unlock(void *opaque)
{
    struct guest *g = opaque;
    if (!g->job) {
        return;
    }
    uint64_t done, total;
    ct_job_progress(g->job, &done, &total);
    /* Ahead of the job (not streamed yet) and behind it, alternately. */
    uint64_t at =
        g->writes % 2 ? done + 2 * MiB + (rnd() % 64) * 4096 : (rnd() % (SIZE / 4096)) * 4096;
    if (at + 4096 > SIZE) {
        return;
    }
    uint8_t buf[4096];
    memset(buf, 0xee, sizeof(buf));
    T_ASSERT(ct_image_pwrite(g->top, buf, sizeof(buf), at, 0) == 0, "guest write");
    memcpy(g->model + at, buf, sizeof(buf));
    g->writes++;
}

/* base (n random writes, recorded in a new model) <- top (empty). Returns the model. */
static uint8_t *two_layers(const char *base, const char *top, unsigned n)
{
    uint8_t *model = calloc(1, SIZE);
    create(base, NULL, 65536);
    create(top, base, 65536);
    struct ct_image *b = open_rw(base, 0);
    scribble(b, model, n);
    ct_image_close(b, NULL);
    return model;
}

static void test_guest_writes(void)
{
    uint8_t *model = two_layers("g-base.qcow2", "g-top.qcow2", 60);
    struct ct_image *top = open_rw("g-top.qcow2", 0);
    struct guest g = {.top = top, .model = model};
    struct ct_job_opts jo = {
        .io_lock = g_lock, .io_unlock = g_unlock, .opaque = &g, .buf_bytes = 256 << 10};
    struct ct_stream_opts so = {.img = top};
    struct ct_job *job;
    struct ct_err err = {0};
    T_ASSERT(ct_job_stream_create(&job, &so, &jo, &err) == 0, "stream: %s", err.msg);
    g.job = job;
    T_ASSERT(ct_job_run(job, &err) == 0, "stream run: %s", err.msg);
    g.job = NULL;
    ct_job_free(job);
    T_CHECK(g.writes > 20, "only %u guest writes happened", g.writes);
    expect(top, model, "guest writes during stream");
    ct_image_close(top, NULL);
    top = open_rw("g-top.qcow2", 0);
    T_CHECK(ct_image_backing(top) == NULL, "the streamed top still has a backing file");
    expect(top, model, "guest writes during stream, reopened");
    ct_image_close(top, NULL);
    free(model);
}

/* ---- 2. offline stream and commit against the model ---- */

static void test_offline(unsigned seed)
{
    rng = seed;
    static const unsigned cs[] = {512, 4096, 65536, 2 * 1024 * 1024};
    uint8_t *model = calloc(1, SIZE);
    create("o-base.qcow2", NULL, cs[rnd() % 4]);
    create("o-mid.qcow2", "o-base.qcow2", cs[rnd() % 4]);
    create("o-top.qcow2", "o-mid.qcow2", cs[rnd() % 4]);
    const char *names[] = {"o-base.qcow2", "o-mid.qcow2", "o-top.qcow2"};
    for (int i = 0; i < 3; i++) {
        /* With its chain: a partial-cluster write copies the rest from below, as in use. */
        struct ct_image *l = open_rw(names[i], 0);
        scribble(l, model, 20);
        ct_image_close(l, NULL);
    }
    bool do_stream = seed % 2;
    struct ct_err err = {0};
    struct ct_job *job;
    struct ct_job_opts jo = {.buf_bytes = (64u << 10) << (rnd() % 5)};
    if (do_stream) {
        struct ct_image *top = open_rw("o-top.qcow2", 0);
        struct ct_stream_opts so = {.img = top};
        T_ASSERT(ct_job_stream_create(&job, &so, &jo, &err) == 0, "stream: %s", err.msg);
        T_ASSERT(ct_job_run(job, &err) == 0, "seed %u: stream: %s", seed, err.msg);
        ct_job_free(job);
        expect(top, model, "offline stream");
        ct_image_close(top, NULL);
    } else {
        /* commit top and mid into base (layers opened alone, base with its chain) */
        struct ct_image *layers[2] = {open_rw("o-top.qcow2", CT_OPEN_NO_BACKING),
                                      open_rw("o-mid.qcow2", CT_OPEN_NO_BACKING)};
        struct ct_image *base = open_rw("o-base.qcow2", 0);
        struct ct_commit_opts co = {.layers = layers, .nb_layers = 2, .base = base};
        T_ASSERT(ct_job_commit_create(&job, &co, &jo, &err) == 0, "commit: %s", err.msg);
        T_ASSERT(ct_job_run(job, &err) == 0, "seed %u: commit: %s", seed, err.msg);
        ct_job_free(job);
        expect(base, model, "offline commit");
        ct_image_close(layers[0], NULL);
        ct_image_close(layers[1], NULL);
        ct_image_close(base, NULL);
    }
    free(model);
}

/* ---- 3. a write failure in the writer ---- */

static void test_write_failure(void)
{
    uint8_t *model = two_layers("f-base.qcow2", "f-top.qcow2", 40);
    char pristine[300];
    snprintf(pristine, sizeof(pristine), "cp %s %s", path("f-top.qcow2"), path("f-top.orig"));
    T_ASSERT(system(pristine) == 0, "cp");
    for (unsigned k = 1; k <= 24; k += 3) {
        snprintf(pristine, sizeof(pristine), "cp %s %s", path("f-top.orig"), path("f-top.qcow2"));
        T_ASSERT(system(pristine) == 0, "cp");
        T_ASSERT(ct_fault_configure("count") == 0, "count");
        struct ct_image *top = open_rw("f-top.qcow2", 0);
        char spec[64];
        uint64_t w0, f0;
        ct_fault_counts(&w0, &f0);
        snprintf(spec, sizeof(spec), "write:%llu:eio", (unsigned long long)(w0 + k));
        T_ASSERT(ct_fault_configure(spec) == 0, "fault spec %s", spec);
        struct ct_stream_opts so = {.img = top};
        struct ct_job_opts jo = {.buf_bytes = 256 << 10};
        struct ct_job *job;
        struct ct_err err = {0};
        T_ASSERT(ct_job_stream_create(&job, &so, &jo, &err) == 0, "stream: %s", err.msg);
        int r = ct_job_run(job, &err);
        ct_job_free(job);
        ct_fault_configure(NULL);
        T_CHECK(r == -EIO, "K=%u: stream returned %d (%s), want -EIO", k, r, err.msg);
        T_CHECK(strstr(err.msg, "writing to") || strstr(err.msg, "flush"),
                "K=%u: message names no write: %s", k, err.msg);
        ct_image_close(top, NULL);
        /* Nothing lost: the top still reads as the chain did (S1). */
        top = open_rw("f-top.qcow2", 0);
        expect(top, model, "after a failed stream");
        ct_image_close(top, NULL);
    }
    free(model);
}

int main(int argc, char **argv)
{
    T_ASSERT(mkdtemp(dir) != NULL, "mkdtemp");
    unsigned seeds = argc > 1 ? (unsigned)atoi(argv[1]) : 12;
    const char *lg = getenv("COWTREE_TEST_LONG");
    if (argc <= 1 && lg && *lg == '1') {
        seeds = 60;
    }
    rng = 7;
    test_guest_writes();
    for (unsigned s = 1; s <= seeds; s++) {
        test_offline(s);
    }
    test_write_failure();
    char cmd[300];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    if (system(cmd) != 0) {
        fprintf(stderr, "could not remove %s\n", dir);
    }
    return t_done();
}
