/*
 * The stream job (virsh blockpull offline, QEMU block-stream): copy into an image what its
 * backing chain provides above base, then link the image to base (or to nothing).
 *
 * Invariants:
 *  S1. Only clusters the image does not allocate itself are written, and only with the bytes
 *      its chain shows there now: the image's guest view never changes while the job runs, so
 *      a failure, cancel or kill leaves it (and its chain) valid and reading as before. The
 *      allocation is checked again right before each write (for_unallocated): in cowtreed,
 *      a guest may have written the range while the job waited at a pause point.
 *  S2. Zeros provided above base (ZERO clusters, or the end of a shorter layer) are written
 *      as zeros that keep hiding base after the link changes (job_write_zeroes_hiding), unless
 *      base reads zero there too (or there is no base).
 *  S3. The link changes last, after a flush: before it the old chain is intact, after it the
 *      image holds everything above base.
 *
 * Offline, reads of the chain and writes into the image overlap through the write pipeline
 * (pipe.h); it is drained whenever this thread asks the image itself for its allocation.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "job/chain.h"
#include "job/job-int.h"
#include "job/pipe.h"
#include "util/err.h"
#include "util/misc.h"

#define ZERO_STEP (1ull << 30)

struct stream_state {
    struct ct_image *img, *base;
    struct ct_image **layers; /* img's backing chain, down to the layer above base */
    unsigned n;
    char *backing, *fmt;
    uint8_t *zbuf; /* zeros, for the writer's zero writes */
    uint64_t zbuf_len;
    struct job_pipe pipe; /* writes into img (pipe.h) */
    uint64_t run_off, run_len;
};

/* ---- run in the pipeline's writer (pipe.h): img only ---- */

/*
 * Apply op to the parts of [off, off+len) that img still does not allocate (S1). Under an I/O
 * lock, guests may have written there since the job looked (at a pause point): their data
 * must stay. The check and the write happen without a pause point between them, so no guest
 * write can slip in.
 */
static int for_unallocated(struct stream_state *s, uint64_t len, uint64_t off,
                           int (*op)(struct stream_state *s, uint64_t rel, uint64_t n, uint64_t at,
                                     const void *arg),
                           const void *arg, struct ct_err *err)
{
    for (uint64_t p = off; p < off + len;) {
        struct ct_extent e;
        int r = ct_image_block_status(s->img, p, off + len - p, &e);
        if (r == 0 && e.len == 0) {
            r = -EIO;
        }
        if (r < 0) {
            return job_io_error(err, r, "reading the allocation of", s->img, p);
        }
        if (!(e.flags & CT_STATUS_ALLOCATED)) {
            r = op(s, p - off, e.len, p, arg);
            if (r < 0) {
                return job_io_error(err, r, "writing to", s->img, p);
            }
        }
        p += e.len;
    }
    return 0;
}

static int put_data(struct stream_state *s, uint64_t rel, uint64_t n, uint64_t at, const void *b)
{
    return ct_image_pwrite(s->img, (const uint8_t *)b + rel, n, at, 0);
}

static int put_zero(struct stream_state *s, uint64_t rel, uint64_t n, uint64_t at, const void *b)
{
    (void)rel;
    (void)b;
    return job_write_zeroes_hiding(s->img, n, at, s->zbuf, s->zbuf_len);
}

static int write_data(void *ctx, const uint8_t *buf, uint64_t len, uint64_t off, struct ct_err *err)
{
    return for_unallocated(ctx, len, off, put_data, buf, err);
}

static int write_zero(void *ctx, uint64_t len, uint64_t off, struct ct_err *err)
{
    return for_unallocated(ctx, len, off, put_zero, NULL, err);
}

static const struct job_pipe_ops stream_pipe_ops = {.data = write_data, .zero = write_zero};

/* ---- the job's thread: img's allocation (pipeline drained), the chain's, and reads ---- */

/* Returns 0, < 0 with err set, or < 0 for a pipeline failure (job_pipe_drain says why). */
static int flush_run(struct ct_job *job, struct stream_state *s, struct ct_err *err)
{
    if (s->run_len == 0) {
        return 0;
    }
    uint64_t off = s->run_off, len = s->run_len;
    s->run_len = 0;
    uint8_t *buf = job_pipe_buf(&s->pipe);
    if (!buf) {
        return -EIO;
    }
    /* Every byte of the run is provided above base: reading through the chain gives it. */
    int r = job_read_view(s->layers[0], buf, len, off);
    if (r < 0) {
        job_pipe_unbuf(&s->pipe, buf);
        return job_io_error(err, r, "reading", s->layers[0], off);
    }
    r = job_pipe_put_data(&s->pipe, buf, len, off);
    return r < 0 ? r : job_ratelimit(job, len);
}

/* [pos, end) was not allocated in img: stream what the chain above base decides there. */
static int stream_range(struct ct_job *job, struct stream_state *s, uint64_t pos, uint64_t end,
                        struct ct_err *err)
{
    uint64_t bufsz = job_buf_bytes(job);
    while (pos < end) {
        int r = job_pause_point(job);
        if (r < 0) {
            return r;
        }
        struct job_extent e;
        r = job_chain_status(s->layers, s->n, pos, end - pos, &e);
        if (r < 0) {
            return job_io_error(err, r, "reading the allocation of", s->layers[0], pos);
        }
        uint64_t len = e.len;
        if (e.layer == s->n) {
            /* Falls through to base, before and after. */
        } else if (e.flags & CT_STATUS_ZERO) {
            len = CT_MIN(len, ZERO_STEP);
            r = flush_run(job, s, err);
            if (r == 0 && s->base && !job_reads_zero(s->base, pos, len)) {
                r = job_pipe_put_zero(&s->pipe, len, pos);
            }
            if (r < 0) {
                return r;
            }
        } else {
            if (s->run_len && (s->run_off + s->run_len != pos || s->run_len == bufsz)) {
                r = flush_run(job, s, err);
                if (r < 0) {
                    return r;
                }
            }
            if (!s->run_len) {
                s->run_off = pos;
            }
            len = CT_MIN(len, bufsz - s->run_len);
            s->run_len += len;
        }
        pos += len;
        job_progress_update(job, len);
    }
    return 0;
}

static int stream_all(struct ct_job *job, struct stream_state *s, uint64_t size, struct ct_err *err)
{
    uint64_t pos = 0;
    while (pos < size) {
        /* img is the writer's while the pipeline runs: take it back to ask. */
        struct ct_err werr = {0};
        int r = job_pipe_drain(&s->pipe, &werr);
        if (r < 0) {
            return r;
        }
        struct ct_extent e;
        r = ct_image_block_status(s->img, pos, CT_MIN(size - pos, JOB_STATUS_STEP), &e);
        if (r == 0 && e.len == 0) {
            r = -EIO;
        }
        if (r < 0) {
            return job_io_error(err, r, "reading the allocation of", s->img, pos);
        }
        if (e.flags & CT_STATUS_ALLOCATED) {
            r = flush_run(job, s, err);
            if (r < 0) {
                return r;
            }
            job_progress_update(job, e.len);
        } else {
            r = stream_range(job, s, pos, pos + e.len, err);
            if (r < 0) {
                return r;
            }
        }
        pos += e.len;
    }
    return flush_run(job, s, err);
}

static int stream_run(struct ct_job *job, struct ct_err *err)
{
    struct stream_state *s = job_opaque(job);
    uint64_t size = ct_image_size(s->img);
    uint64_t bufsz = job_buf_bytes(job);
    job_progress_set_total(job, size);
    job_write_behind(job, s->img);
    if (s->n == 0) {
        return 0;
    }
    s->zbuf = job_buf_alloc(bufsz);
    if (!s->zbuf) {
        return ct_err_set(err, -ENOMEM, "out of memory");
    }
    memset(s->zbuf, 0, bufsz);
    s->zbuf_len = bufsz;
    int r = job_pipe_init(&s->pipe, job, s->img, &stream_pipe_ops, s, bufsz, err);
    if (r < 0) {
        return r;
    }
    /* Whatever happened, what was queued reaches img before anyone else touches it. */
    r = job_pipe_finish(&s->pipe, stream_all(job, s, size, err), err);
    if (r < 0) {
        return r;
    }
    r = ct_image_flush(s->img);
    return r < 0 ? job_io_error(err, r, "flushing", s->img, 0) : 0;
}

static int stream_prepare(struct ct_job *job, struct ct_err *err)
{
    struct stream_state *s = job_opaque(job);
    if (s->n == 0 && !s->backing && !ct_image_backing(s->img)) {
        return 0; /* nothing to unlink (and raw images have no link to rewrite) */
    }
    int r = ct_image_change_backing(s->img, s->backing, s->fmt, err);
    if (r == 0) {
        r = ct_image_flush(s->img);
        if (r < 0) {
            ct_err_set(err, r, "error while flushing '%s': %s", ct_image_filename(s->img),
                       ct_strerror(r));
        }
    } else {
        ct_err_prefix(err, "%s: ", ct_image_filename(s->img));
    }
    return r;
}

static void stream_abort(struct ct_job *job)
{
    struct stream_state *s = job_opaque(job);
    (void)ct_image_flush(s->img);
}

static void stream_clean(struct ct_job *job)
{
    struct stream_state *s = job_opaque(job);
    free(s->zbuf);
    s->zbuf = NULL;
}

static void stream_free(struct ct_job *job)
{
    struct stream_state *s = job_opaque(job);
    if (!s) {
        return;
    }
    free(s->zbuf);
    free(s->layers);
    free(s->backing);
    free(s->fmt);
    free(s);
}

static const struct job_driver stream_driver = {
    .type = "stream",
    .run = stream_run,
    .prepare = stream_prepare,
    .abort = stream_abort,
    .clean = stream_clean,
    .free = stream_free,
};

int ct_job_stream_create(struct ct_job **out, const struct ct_stream_opts *o,
                         const struct ct_job_opts *jo, struct ct_err *err)
{
    *out = NULL;
    if (o->backing && *o->backing && !o->backing_fmt) {
        return ct_err_set(err, -EINVAL, "a backing file needs a format");
    }
    unsigned n = 0;
    for (struct ct_image *l = ct_image_backing(o->img); l != o->base; l = ct_image_backing(l)) {
        if (!l) {
            return ct_err_set(err, -EINVAL, "'%s' is not in the backing chain of '%s'",
                              ct_image_filename(o->base), ct_image_filename(o->img));
        }
        n++;
    }
    struct stream_state *s = calloc(1, sizeof(*s));
    if (!s) {
        return ct_err_set(err, -ENOMEM, "out of memory");
    }
    s->img = o->img;
    s->base = o->base;
    s->n = n;
    s->layers = calloc(n + 1, sizeof(*s->layers));
    bool link = o->backing && *o->backing;
    s->backing = link ? strdup(o->backing) : NULL;
    s->fmt = link ? strdup(o->backing_fmt) : NULL;
    if (!s->layers || (link && (!s->backing || !s->fmt))) {
        free(s->layers);
        free(s->backing);
        free(s->fmt);
        free(s);
        return ct_err_set(err, -ENOMEM, "out of memory");
    }
    struct ct_image *l = ct_image_backing(o->img);
    for (unsigned i = 0; i < n; i++, l = ct_image_backing(l)) {
        s->layers[i] = l;
    }
    return job_create(out, &stream_driver, s, jo, err);
}
