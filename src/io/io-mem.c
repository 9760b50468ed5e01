/*
 * In-memory files for fuzzers and unit tests: the same ops as POSIX files over a growable
 * private buffer. Sizes are capped so hostile images cannot make a fuzzer allocate without
 * bound.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "io/io.h"

#define MEM_FILE_MAX (256u << 20)

struct mem_file {
    struct ct_file base;
    uint8_t *data;
    size_t len;
};

static int mem_pread(struct ct_file *f, void *buf, size_t len, uint64_t off)
{
    struct mem_file *m = (struct mem_file *)f;
    size_t avail = off < m->len ? m->len - off : 0;
    size_t n = len < avail ? len : avail;
    if (n) {
        memcpy(buf, m->data + off, n);
    }
    memset((uint8_t *)buf + n, 0, len - n);
    return 0;
}

static int mem_resize(struct mem_file *m, uint64_t size)
{
    if (size > MEM_FILE_MAX) {
        return -EFBIG;
    }
    uint8_t *p = realloc(m->data, size ? size : 1);
    if (!p) {
        return -ENOMEM;
    }
    if (size > m->len) {
        memset(p + m->len, 0, size - m->len);
    }
    m->data = p;
    m->len = size;
    return 0;
}

static int mem_pwrite(struct ct_file *f, const void *buf, size_t len, uint64_t off)
{
    struct mem_file *m = (struct mem_file *)f;
    if (off + len > m->len) {
        int r = mem_resize(m, off + len);
        if (r < 0) {
            return r;
        }
    }
    memcpy(m->data + off, buf, len);
    return 0;
}

static int mem_flush(struct ct_file *f)
{
    return 0;
}

static int mem_truncate(struct ct_file *f, uint64_t size)
{
    return mem_resize((struct mem_file *)f, size);
}

static int64_t mem_size(struct ct_file *f)
{
    return (int64_t)((struct mem_file *)f)->len;
}

static int mem_punch(struct ct_file *f, uint64_t off, uint64_t len)
{
    struct mem_file *m = (struct mem_file *)f;
    if (off < m->len) {
        memset(m->data + off, 0, (off + len > m->len ? m->len : off + len) - off);
    }
    return 0;
}

static int mem_prealloc(struct ct_file *f, uint64_t off, uint64_t len)
{
    struct mem_file *m = (struct mem_file *)f;
    return off + len > m->len ? mem_resize(m, off + len) : 0;
}

static void mem_close(struct ct_file *f)
{
    free(((struct mem_file *)f)->data);
}

static const struct ct_file_ops mem_ops = {
    .pread = mem_pread,
    .pwrite = mem_pwrite,
    .flush = mem_flush,
    .truncate = mem_truncate,
    .size = mem_size,
    .allocated = mem_size,
    .punch = mem_punch,
    .prealloc = mem_prealloc,
    .close = mem_close,
};

int ct_file_open_mem(struct ct_file **out, const void *data, size_t len, bool writable)
{
    *out = NULL;
    struct mem_file *m = calloc(1, sizeof(*m));
    if (!m) {
        return -ENOMEM;
    }
    m->base.ops = &mem_ops;
    m->base.fd = -1;
    m->base.writable = writable;
    m->base.path = strdup("<memory>");
    m->data = malloc(len ? len : 1);
    if (!m->base.path || !m->data) {
        free(m->base.path);
        free(m->data);
        free(m);
        return -ENOMEM;
    }
    if (len) {
        memcpy(m->data, data, len);
    }
    m->len = len;
    *out = &m->base;
    return 0;
}
