/*
 * The parallel copy (src/job/copy.c, convert -m) through the job API: a qcow2 source with
 * scattered data, zero clusters and zero runs inside data, copied by 8 threads into qcow2
 * targets (4 readers, in order and out of order) and a raw target, reads back byte for byte
 * as the source; in order, the target's host clusters follow guest order; the targets check
 * clean; a source handle a thread cannot open fails the job with that thread's message.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../unit/t.h"
#include "job/job.h"
#include "util/err.h"

#define SIZE (96ull << 20)
#define CS   65536ull

static char dir[] = "/tmp/ct-unit-copy.XXXXXX";
static char src_path[256];

static int open_src(void *opaque, unsigned i, struct ct_image **out, struct ct_err *err)
{
    const char *path = opaque;
    struct ct_open_opts o = {.format = "qcow2"};
    (void)i;
    return ct_image_open(out, path, &o, err);
}

static void make_source(void)
{
    snprintf(src_path, sizeof(src_path), "%s/src.qcow2", dir);
    struct ct_create_opts co = {.format = "qcow2", .size = SIZE, .size_given = true};
    struct ct_err err = {0};
    T_ASSERT(ct_image_create(src_path, &co, &err) == 0, "create: %s", err.msg);
    struct ct_image *img;
    struct ct_open_opts o = {.format = "qcow2", .flags = CT_OPEN_WRITE};
    T_ASSERT(ct_image_open(&img, src_path, &o, &err) == 0, "open: %s", err.msg);
    uint8_t *buf = malloc(3 * CS);
    unsigned seed = 7;
    for (uint64_t c = 0; c < SIZE / CS; c++) {
        seed = seed * 1103515245u + 12345u;
        unsigned kind = (seed >> 16) % 8;
        if (kind >= 3) {
            continue; /* unallocated */
        }
        if (kind == 2) {
            T_ASSERT(ct_image_pwrite_zeroes(img, CS, c * CS, 0) == 0, "zero write");
            continue;
        }
        for (uint64_t k = 0; k < CS; k++) {
            buf[k] = (uint8_t)(c * 31 + k / 512);
        }
        if (kind == 1) {
            memset(buf + 8192, 0, 16384); /* a zero run inside data */
        }
        T_ASSERT(ct_image_pwrite(img, buf, CS, c * CS, 0) == 0, "data write");
    }
    free(buf);
    T_ASSERT(ct_image_close(img, &err) == 0, "close: %s", err.msg);
}

/* Copy the source into a new target of format fmt; returns the open target. */
static struct ct_image *copy_to(const char *name, const char *fmt, unsigned readers, bool ooo,
                                int (*opener)(void *, unsigned, struct ct_image **,
                                              struct ct_err *),
                                int *result, struct ct_err *jerr)
{
    char path[300];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    struct ct_err err = {0};
    struct ct_create_opts co = {.format = fmt, .size = SIZE, .size_given = true};
    T_ASSERT(ct_image_create(path, &co, &err) == 0, "create %s: %s", name, err.msg);
    struct ct_image *src, *dst;
    struct ct_open_opts so = {.format = "qcow2"}, dop = {.format = fmt, .flags = CT_OPEN_WRITE};
    T_ASSERT(ct_image_open(&src, src_path, &so, &err) == 0, "open src: %s", err.msg);
    T_ASSERT(ct_image_open(&dst, path, &dop, &err) == 0, "open %s: %s", name, err.msg);
    struct ct_copy_opts cpo = {
        .srcs = &src,
        .nb_srcs = 1,
        .dst = dst,
        .dst_is_zero = true,
        .min_sparse = 4096,
        .nb_workers = 8,
        .open_src = opener,
        .open_opaque = src_path,
        .max_readers = readers,
        .out_of_order = ooo,
    };
    struct ct_job_opts jo = {.buf_bytes = 256 * 1024}; /* many items */
    struct ct_job *job;
    T_ASSERT(ct_job_copy_create(&job, &cpo, &jo, &err) == 0, "copy create: %s", err.msg);
    *result = ct_job_run(job, jerr);
    ct_job_free(job);
    ct_image_close(src, NULL);
    return dst;
}

static void same_as_source(struct ct_image *dst, const char *what)
{
    struct ct_image *src;
    struct ct_err err = {0};
    struct ct_open_opts so = {.format = "qcow2"};
    T_ASSERT(ct_image_open(&src, src_path, &so, &err) == 0, "open src: %s", err.msg);
    uint8_t *a = malloc(1 << 20), *b = malloc(1 << 20);
    int bad = 0;
    for (uint64_t off = 0; off < SIZE && !bad; off += 1 << 20) {
        T_ASSERT(ct_image_pread(src, a, 1 << 20, off) == 0, "read src");
        T_ASSERT(ct_image_pread(dst, b, 1 << 20, off) == 0, "read dst");
        bad = memcmp(a, b, 1 << 20) != 0;
        T_CHECK(!bad, "%s: differs in the MiB at %llu", what, (unsigned long long)off);
    }
    free(a);
    free(b);
    ct_image_close(src, NULL);
}

static void clean(struct ct_image *dst, const char *what)
{
    struct ct_check_result res;
    struct ct_err err = {0};
    T_CHECK(ct_image_check(dst, 0, &res, NULL, NULL, &err) == 0, "%s: check: %s", what, err.msg);
    T_CHECK(res.corruptions == 0 && res.leaks == 0, "%s: %llu corruptions, %llu leaks", what,
            (unsigned long long)res.corruptions, (unsigned long long)res.leaks);
}

/* Host offsets of data never go down along guest offsets. */
static bool in_guest_order(struct ct_image *dst)
{
    uint64_t last = 0;
    for (uint64_t off = 0; off < SIZE;) {
        struct ct_extent e;
        if (ct_image_block_status(dst, off, SIZE - off, &e) < 0 || e.len == 0) {
            return false;
        }
        if (e.flags & CT_STATUS_DATA) {
            if (e.host_off < last) {
                return false;
            }
            last = e.host_off;
        }
        off += e.len;
    }
    return true;
}

static int fail_open(void *opaque, unsigned i, struct ct_image **out, struct ct_err *err)
{
    (void)opaque;
    (void)i;
    *out = NULL;
    return ct_err_set(err, -EMFILE, "no handle for this thread");
}

int main(void)
{
    T_ASSERT(mkdtemp(dir) != NULL, "mkdtemp");
    make_source();
    struct ct_err jerr = {0};
    int r;

    struct ct_image *d = copy_to("inorder.qcow2", "qcow2", 4, false, open_src, &r, &jerr);
    T_CHECK(r == 0, "in order: %s", jerr.msg);
    same_as_source(d, "qcow2 in order");
    T_CHECK(in_guest_order(d), "qcow2 in order: host clusters out of guest order");
    clean(d, "qcow2 in order");
    ct_image_close(d, NULL);

    d = copy_to("ooo.qcow2", "qcow2", 4, true, open_src, &r, &jerr);
    T_CHECK(r == 0, "out of order: %s", jerr.msg);
    same_as_source(d, "qcow2 out of order");
    clean(d, "qcow2 out of order");
    ct_image_close(d, NULL);

    d = copy_to("t.raw", "raw", 0, false, open_src, &r, &jerr);
    T_CHECK(r == 0, "raw: %s", jerr.msg);
    same_as_source(d, "raw");
    ct_image_close(d, NULL);

    d = copy_to("fail.qcow2", "qcow2", 4, false, fail_open, &r, &jerr);
    T_CHECK(r == -EMFILE, "failed open: got %d", r);
    T_CHECK(strstr(jerr.msg, "no handle for this thread") != NULL, "message: %s", jerr.msg);
    clean(d, "after a failed copy");
    ct_image_close(d, NULL);

    char cmd[300];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    T_CHECK(system(cmd) == 0, "cleanup");
    return t_done();
}
