/*
 * Raw images: guest offset = file offset. The file's size is the virtual size.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "image/image.h"
#include "util/err.h"
#include "util/misc.h"

static int raw_open(struct ct_image *img, struct ct_err *err)
{
    int64_t s = ct_file_size(img->file);
    if (s < 0) {
        return ct_err_set(err, (int)s, "Could not get size of '%s': %s", img->filename,
                          ct_strerror((int)s));
    }
    img->size = (uint64_t)s;
    return 0;
}

static int raw_close(struct ct_image *img)
{
    return img->writable && !img->poison ? ct_file_flush(img->file) : 0;
}

static int raw_pread(struct ct_image *img, void *buf, uint64_t len, uint64_t off)
{
    return ct_file_pread(img->file, buf, len, off);
}

static int raw_pwrite(struct ct_image *img, const void *buf, uint64_t len, uint64_t off)
{
    return ct_file_pwrite(img->file, buf, len, off);
}

static int raw_pwrite_zeroes(struct ct_image *img, uint64_t len, uint64_t off, unsigned flags)
{
    static const uint8_t zeros[65536];
    while (len > 0) {
        uint64_t n = CT_MIN(len, sizeof(zeros));
        int r = ct_file_pwrite(img->file, zeros, n, off);
        if (r < 0) {
            return r;
        }
        off += n;
        len -= n;
    }
    return 0;
}

static int raw_discard(struct ct_image *img, uint64_t len, uint64_t off)
{
    /* Advisory, like QEMU's raw discard: a failure to punch is not an error. */
    (void)ct_file_punch(img->file, off, len);
    return 0;
}

static int raw_flush(struct ct_image *img)
{
    return ct_file_flush(img->file);
}

static int raw_block_status(struct ct_image *img, uint64_t off, uint64_t len, struct ct_extent *out)
{
    bool hole;
    uint64_t n;
    int r = ct_file_extent(img->file, off, len, &hole, &n);
    if (r < 0) {
        return r;
    }
    /* A hole in a raw file still belongs to this layer: it reads as zero. */
    out->len = n ? n : len;
    out->flags = CT_STATUS_ALLOCATED | (hole ? CT_STATUS_ZERO : CT_STATUS_DATA);
    out->host_off = off;
    return 0;
}

static int raw_truncate(struct ct_image *img, uint64_t size, bool shrink, struct ct_err *err)
{
    int r = ct_file_truncate(img->file, size);
    if (r < 0) {
        return ct_err_set(err, r, "Could not resize '%s': %s", img->filename, ct_strerror(r));
    }
    img->size = size;
    return 0;
}

const struct ct_driver ct_raw_driver = {
    .name = "raw",
    .open = raw_open,
    .close = raw_close,
    .pread = raw_pread,
    .pwrite = raw_pwrite,
    .pwrite_zeroes = raw_pwrite_zeroes,
    .discard = raw_discard,
    .flush = raw_flush,
    .block_status = raw_block_status,
    .direct_data = true,
    .truncate = raw_truncate,
};
