/*
 * Chain helpers for the jobs; see chain.h. Only the public image API is used here.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "job/chain.h"
#include "util/err.h"
#include "util/misc.h"

int job_chain_status(struct ct_image *const *layers, unsigned n, uint64_t off, uint64_t len,
                     struct job_extent *out)
{
    for (unsigned i = 0; i < n; i++) {
        uint64_t size = ct_image_size(layers[i]);
        if (off >= size) {
            out->len = len;
            out->flags = CT_STATUS_ALLOCATED | CT_STATUS_ZERO;
            out->layer = i;
            return 0;
        }
        len = CT_MIN(len, size - off);
        struct ct_extent e;
        int r = ct_image_block_status(layers[i], off, len, &e);
        if (r < 0) {
            return r;
        }
        if (e.len == 0) {
            return -EIO;
        }
        len = CT_MIN(len, e.len);
        if (e.flags & CT_STATUS_ALLOCATED) {
            out->len = len;
            out->flags = e.flags;
            out->layer = i;
            return 0;
        }
    }
    out->len = len;
    out->flags = 0;
    out->layer = n;
    return 0;
}

bool job_reads_zero(struct ct_image *img, uint64_t off, uint64_t len)
{
    uint64_t size = ct_image_size(img);
    if (off >= size) {
        return true;
    }
    uint64_t end = CT_MIN(off + len, size);
    while (off < end) {
        struct ct_map_extent m;
        if (ct_image_map(img, off, end - off, &m) < 0 || m.len == 0) {
            return false;
        }
        if (!(m.flags & CT_STATUS_ZERO)) {
            return false;
        }
        off += m.len;
    }
    return true;
}

int job_read_view(struct ct_image *img, void *buf, uint64_t len, uint64_t off)
{
    uint64_t n = 0;
    if (img) {
        uint64_t size = ct_image_size(img);
        if (off < size) {
            n = CT_MIN(len, size - off);
            int r = ct_image_pread(img, buf, n, off);
            if (r < 0) {
                return r;
            }
        }
    }
    memset((uint8_t *)buf + n, 0, len - n);
    return 0;
}

bool job_same_path(const char *a, const char *b)
{
    struct stat sa, sb;
    if (stat(a, &sa) < 0 || stat(b, &sb) < 0) {
        return false;
    }
    return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

bool job_same_file(const struct ct_image *a, const struct ct_image *b)
{
    return job_same_path(ct_image_filename(a), ct_image_filename(b));
}

bool job_is_zero(const void *buf, size_t len)
{
    const uint8_t *p = buf;
    /* Check the head byte-wise, then compare the buffer with itself shifted by 16 bytes. */
    size_t head = CT_MIN(len, 16);
    for (size_t i = 0; i < head; i++) {
        if (p[i]) {
            return false;
        }
    }
    return len <= 16 || memcmp(p, p + 16, len - 16) == 0;
}

static int write_zero_data(struct ct_image *img, uint64_t len, uint64_t off, const void *zbuf,
                           size_t zbuf_len)
{
    while (len > 0) {
        uint64_t n = CT_MIN(len, (uint64_t)zbuf_len);
        int r = ct_image_pwrite(img, zbuf, n, off, 0);
        if (r < 0) {
            return r;
        }
        off += n;
        len -= n;
    }
    return 0;
}

int job_write_zeroes_hiding(struct ct_image *img, uint64_t len, uint64_t off, const void *zbuf,
                            size_t zbuf_len)
{
    struct ct_image_info info;
    if (ct_image_info(img, &info) < 0 || strcmp(info.format, "qcow2") != 0 || info.version < 3) {
        return write_zero_data(img, len, off, zbuf, zbuf_len);
    }
    /* Zero flags only for whole units: a partial unit may be left unallocated by a zero write
     * when the current backing reads zero there, and would show the next backing's data. */
    uint64_t unit = info.extended_l2 ? info.cluster_size / 32 : info.cluster_size;
    uint64_t end = off + len, size = ct_image_size(img);
    uint64_t a = ct_align_up(off, unit);
    uint64_t b = end == size ? ct_align_up(end, unit) : ct_align_down(end, unit);
    if (a >= b) {
        return write_zero_data(img, len, off, zbuf, zbuf_len);
    }
    int r = 0;
    if (a > off) {
        r = write_zero_data(img, a - off, off, zbuf, zbuf_len);
    }
    if (r == 0) {
        r = ct_image_pwrite_zeroes(img, CT_MIN(b, end) - a, a, CT_WRITE_UNMAP);
    }
    if (r == 0 && b < end) {
        r = write_zero_data(img, end - b, b, zbuf, zbuf_len);
    }
    return r;
}

uint64_t job_alloc_unit(struct ct_image *img)
{
    struct ct_image_info info;
    if (ct_image_info(img, &info) < 0 || info.cluster_size == 0) {
        return 512;
    }
    return info.extended_l2 ? info.cluster_size / 32 : info.cluster_size;
}

void *job_buf_alloc(size_t len)
{
    void *p = NULL;
    if (posix_memalign(&p, 4096, len ? len : 4096) != 0) {
        return NULL;
    }
    return p;
}

int job_io_error(struct ct_err *err, int r, const char *what, const struct ct_image *img,
                 uint64_t off)
{
    if (r == -ECANCELED) {
        return r;
    }
    return ct_err_set(err, r, "error while %s '%s' at offset %llu: %s", what,
                      ct_image_filename(img), (unsigned long long)off, ct_strerror(r));
}
