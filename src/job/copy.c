/*
 * The copy job (qemu-img convert): the guest view of one or more sources, concatenated, into
 * a target, keeping it sparse.
 *
 *  - Ranges the source chain reads as zero per metadata are not read; they are not written
 *    either when the target already reads zero (dst_is_zero), else written as zeros.
 *  - Data is read in large requests (contiguous extents merged up to the buffer size); inside
 *    it, runs of zero bytes of at least min_sparse bytes (in 512-byte sectors) are treated as
 *    zero ranges (qemu-img -S). min_sparse 0 writes every byte (fully allocated target).
 *  - A target with a backing file and one source (convert -B) is filled by the diff copy
 *    (rebase.c): only what differs from the backing's view is written.
 *
 * Invariant P1: sources are only read; a failure leaves them untouched and the target valid
 * (partly written).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "job/chain.h"
#include "job/job-int.h"
#include "util/err.h"
#include "util/misc.h"

#define ZERO_STEP (1ull << 30)
#define SECTOR    512u

struct copy_state {
    struct ct_image **srcs;
    unsigned n;
    struct ct_image *dst;
    bool dst_is_zero;
    uint64_t min_sparse;
    bool compress;
    uint8_t *buf, *zbuf;
};

static int write_zeroes(struct copy_state *s, uint64_t len, uint64_t off)
{
    if (s->dst_is_zero) {
        return 0;
    }
    if (s->min_sparse == 0) {
        /* Fully allocated: real zero data. */
        while (len > 0) {
            uint64_t n = CT_MIN(len, (uint64_t)ZERO_STEP);
            n = CT_MIN(n, 1u << 20);
            int r = ct_image_pwrite(s->dst, s->zbuf, n, off, 0);
            if (r < 0) {
                return r;
            }
            off += n;
            len -= n;
        }
        return 0;
    }
    return job_write_zeroes_hiding(s->dst, len, off, s->zbuf, 1u << 20);
}

/* Write buf (len bytes for dst offset off), leaving zero runs of min_sparse bytes or more. */
static int write_sparse(struct ct_job *job, struct copy_state *s, const uint8_t *buf, uint64_t len,
                        uint64_t off, struct ct_err *err)
{
    uint64_t written = 0;
    uint64_t i = 0;
    while (i < len) {
        /* Data up to the next zero run long enough to skip. */
        uint64_t ds = i, zs = i, ze = i;
        bool found = false;
        if (s->min_sparse) {
            uint64_t p = i;
            while (p < len) {
                uint64_t n = CT_MIN((uint64_t)SECTOR - (off + p) % SECTOR, len - p);
                if (!job_is_zero(buf + p, n)) {
                    p += n;
                    continue;
                }
                uint64_t q = p + n;
                while (q < len) {
                    uint64_t m = CT_MIN((uint64_t)SECTOR, len - q);
                    if (!job_is_zero(buf + q, m)) {
                        break;
                    }
                    q += m;
                }
                if (q - p >= s->min_sparse) {
                    zs = p;
                    ze = q;
                    found = true;
                    break;
                }
                p = q;
            }
            if (!found) {
                zs = ze = len;
            }
        } else {
            zs = ze = len;
        }
        if (zs > ds) {
            int r = ct_image_pwrite(s->dst, buf + ds, zs - ds, off + ds, 0);
            if (r < 0) {
                return job_io_error(err, r, "writing to", s->dst, off + ds);
            }
            written += zs - ds;
        }
        if (ze > zs) {
            int r = write_zeroes(s, ze - zs, off + zs);
            if (r < 0) {
                return job_io_error(err, r, "writing to", s->dst, off + zs);
            }
        }
        i = ze;
    }
    return job_ratelimit(job, written);
}

/* convert -c: whole target clusters, read from the source and written compressed; clusters
 * that read as zero are left to read zero (or written as zeros when the target is not). */
static int copy_compressed(struct ct_job *job, struct copy_state *s, struct ct_image *src,
                           uint64_t dst_off, struct ct_err *err)
{
    uint64_t cs = ct_image_cluster_size(s->dst), size = ct_image_size(src);
    for (uint64_t pos = 0; pos < size; pos += cs) {
        int r = job_pause_point(job);
        if (r < 0) {
            return r;
        }
        uint64_t n = CT_MIN(cs, size - pos);
        r = ct_image_pread(src, s->buf, n, pos);
        if (r < 0) {
            return job_io_error(err, r, "reading", src, pos);
        }
        if (job_is_zero(s->buf, n)) {
            r = write_zeroes(s, n, dst_off + pos);
        } else {
            memset(s->buf + n, 0, cs - n);
            uint64_t wlen = dst_off + pos + cs <= ct_image_size(s->dst)
                                ? cs
                                : ct_image_size(s->dst) - (dst_off + pos);
            r = ct_image_pwrite_compressed(s->dst, s->buf, wlen, dst_off + pos);
        }
        if (r < 0) {
            return job_io_error(err, r, "writing to", s->dst, dst_off + pos);
        }
        r = job_ratelimit(job, n);
        if (r < 0) {
            return r;
        }
        job_progress_update(job, n);
    }
    return 0;
}

static int copy_one(struct ct_job *job, struct copy_state *s, struct ct_image *src,
                    uint64_t dst_off, struct ct_err *err)
{
    uint64_t size = ct_image_size(src), bufsz = job_buf_bytes(job);
    uint64_t cs = ct_image_cluster_size(s->dst);
    if (s->compress && cs && dst_off % cs == 0 && bufsz >= cs) {
        return copy_compressed(job, s, src, dst_off, err);
    }
    for (uint64_t pos = 0; pos < size;) {
        int r = job_pause_point(job);
        if (r < 0) {
            return r;
        }
        struct ct_map_extent m;
        r = ct_image_map(src, pos, CT_MIN(size - pos, JOB_STATUS_STEP), &m);
        if (r == 0 && m.len == 0) {
            r = -EIO;
        }
        if (r < 0) {
            return job_io_error(err, r, "reading the allocation of", src, pos);
        }
        uint64_t len = m.len;
        if (m.flags & CT_STATUS_ZERO) {
            len = CT_MIN(len, ZERO_STEP);
            r = write_zeroes(s, len, dst_off + pos);
            if (r < 0) {
                return job_io_error(err, r, "writing to", s->dst, dst_off + pos);
            }
        } else {
            /* Merge the following data extents into one large request. */
            len = CT_MIN(len, bufsz);
            while (len < bufsz && pos + len < size) {
                struct ct_map_extent m2;
                if (ct_image_map(src, pos + len, bufsz - len, &m2) < 0 || m2.len == 0 ||
                    (m2.flags & CT_STATUS_ZERO)) {
                    break;
                }
                len += CT_MIN(m2.len, bufsz - len);
            }
            r = ct_image_pread(src, s->buf, len, pos);
            if (r < 0) {
                return job_io_error(err, r, "reading", src, pos);
            }
            r = write_sparse(job, s, s->buf, len, dst_off + pos, err);
            if (r < 0) {
                return r;
            }
        }
        pos += len;
        job_progress_update(job, len);
    }
    return 0;
}

static int copy_run(struct ct_job *job, struct ct_err *err)
{
    struct copy_state *s = job_opaque(job);
    uint64_t total = 0;
    for (unsigned i = 0; i < s->n; i++) {
        total += ct_image_size(s->srcs[i]);
    }
    job_progress_set_total(job, total);
    if (ct_image_size(s->dst) < total) {
        return ct_err_set(err, -EINVAL, "The target '%s' is smaller than the source(s)",
                          ct_image_filename(s->dst));
    }
    if (ct_image_backing(s->dst)) {
        struct job_diff d = {
            .target = s->dst,
            .skip_target_allocated = false,
            .old_top = s->srcs[0],
            .new_top = ct_image_backing(s->dst),
        };
        return job_diff_run(job, &d, err);
    }
    uint64_t bufsz = job_buf_bytes(job);
    s->buf = job_buf_alloc(bufsz);
    s->zbuf = job_buf_alloc(1u << 20);
    if (!s->buf || !s->zbuf) {
        return ct_err_set(err, -ENOMEM, "out of memory");
    }
    memset(s->zbuf, 0, 1u << 20);
    uint64_t off = 0;
    for (unsigned i = 0; i < s->n; i++) {
        int r = copy_one(job, s, s->srcs[i], off, err);
        if (r < 0) {
            return r;
        }
        off += ct_image_size(s->srcs[i]);
    }
    int r = ct_image_flush(s->dst);
    return r < 0 ? job_io_error(err, r, "flushing", s->dst, 0) : 0;
}

static void copy_abort(struct ct_job *job)
{
    struct copy_state *s = job_opaque(job);
    (void)ct_image_flush(s->dst);
}

static void copy_clean(struct ct_job *job)
{
    struct copy_state *s = job_opaque(job);
    free(s->buf);
    free(s->zbuf);
    s->buf = s->zbuf = NULL;
}

static void copy_free(struct ct_job *job)
{
    struct copy_state *s = job_opaque(job);
    if (s) {
        free(s->buf);
        free(s->zbuf);
        free(s->srcs);
        free(s);
    }
}

static const struct job_driver copy_driver = {
    .type = "copy",
    .run = copy_run,
    .abort = copy_abort,
    .clean = copy_clean,
    .free = copy_free,
};

int ct_job_copy_create(struct ct_job **out, const struct ct_copy_opts *o,
                       const struct ct_job_opts *jo, struct ct_err *err)
{
    *out = NULL;
    if (!o->nb_srcs || !o->dst) {
        return ct_err_set(err, -EINVAL, "copy needs a source and a target");
    }
    if (o->min_sparse % SECTOR) {
        return ct_err_set(err, -EINVAL, "the sparse size must be a multiple of 512 bytes");
    }
    if (ct_image_backing(o->dst) && o->nb_srcs != 1) {
        return ct_err_set(err, -CT_E_UNSUPPORTED,
                          "a target with a backing file takes exactly one source");
    }
    struct copy_state *s = calloc(1, sizeof(*s));
    if (!s || !(s->srcs = calloc(o->nb_srcs, sizeof(*s->srcs)))) {
        free(s);
        return ct_err_set(err, -ENOMEM, "out of memory");
    }
    memcpy(s->srcs, o->srcs, o->nb_srcs * sizeof(*s->srcs));
    s->n = o->nb_srcs;
    s->dst = o->dst;
    s->dst_is_zero = o->dst_is_zero;
    s->min_sparse = o->min_sparse;
    s->compress = o->compress;
    return job_create(out, &copy_driver, s, jo, err);
}
