/*
 * The commit job (qemu-img commit, virsh blockcommit offline): merge the layers above base
 * into base.
 *
 * Only what the committed layers decide is copied: for each range, the topmost layer that
 * allocates it (data, or zeros: a ZERO cluster, or the range lying past a shorter layer's
 * end) provides the bytes written into base; ranges none of them allocates are skipped, so
 * the cost follows the layers' allocation, not the virtual size.
 *
 * Invariants:
 *  C1. Until prepare, only base changes, and only in ranges some committed layer decides: the
 *      top's guest view (which reads those layers first) is unchanged at every instant, so a
 *      failure, cancel or kill leaves every image valid and the top reading as before.
 *  C2. Base is grown (never shrunk) to the top's size before any copy: reads past its old end
 *      returned zeros through the overlays, and the grown part reads zeros too.
 *  C3. Prepare flushes base before touching any link, then rewrites the overlays' links, then
 *      empties the top: each step leaves the view of every remaining chain equal to the top's.
 *
 * Reads of the layers and writes into base overlap: base is written by the write pipeline
 * (pipe.h) while this thread reads the next run, in the same order as one request at a time.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "job/chain.h"
#include "job/job-int.h"
#include "job/pipe.h"
#include "util/err.h"
#include "util/misc.h"

/* Zero writes only touch metadata; still bound them so pause and cancel stay responsive. */
#define ZERO_STEP (1ull << 30)

struct commit_state {
    struct ct_image **layers;
    unsigned n;
    struct ct_image *base;
    bool empty_top;
    struct ct_image **overlays;
    unsigned nb_overlays;
    char *ov_backing, *ov_fmt;
    struct job_pipe pipe; /* writes into base (pipe.h) */
    uint8_t *cur;         /* pipeline buffer of the pending data run */
    uint64_t run_off, run_len;
};

/* ---- run in the pipeline's writer (pipe.h): base only ---- */

static int write_data(void *ctx, const uint8_t *buf, uint64_t len, uint64_t off, struct ct_err *err)
{
    struct commit_state *s = ctx;
    int r = ct_image_pwrite(s->base, buf, len, off, 0);
    return r < 0 ? job_io_error(err, r, "writing to", s->base, off) : 0;
}

static int write_zero(void *ctx, uint64_t len, uint64_t off, struct ct_err *err)
{
    struct commit_state *s = ctx;
    if (job_reads_zero(s->base, off, len)) {
        return 0;
    }
    int r = ct_image_pwrite_zeroes(s->base, len, off, CT_WRITE_UNMAP);
    return r < 0 ? job_io_error(err, r, "writing to", s->base, off) : 0;
}

static const struct job_pipe_ops commit_pipe_ops = {.data = write_data, .zero = write_zero};

/* ---- the job's thread: allocation and reads of the committed layers ---- */

static int flush_run(struct ct_job *job, struct commit_state *s)
{
    if (s->run_len == 0) {
        return 0;
    }
    uint64_t n = s->run_len;
    int r = job_pipe_put_data(&s->pipe, s->cur, n, s->run_off);
    s->cur = NULL;
    s->run_len = 0;
    return r < 0 ? r : job_ratelimit(job, n);
}

/* Returns 0, or < 0 with err set by this thread, or < 0 for a pipeline failure (whose
 * message job_pipe_drain gives). */
static int copy_layers(struct ct_job *job, struct commit_state *s, uint64_t size,
                       struct ct_err *err)
{
    uint64_t bufsz = job_buf_bytes(job);
    uint64_t pos = 0;
    while (pos < size) {
        int r = job_pause_point(job);
        if (r < 0) {
            return r;
        }
        struct job_extent e;
        r = job_chain_status(s->layers, s->n, pos, CT_MIN(size - pos, JOB_STATUS_STEP), &e);
        if (r < 0) {
            return job_io_error(err, r, "reading the allocation of", s->layers[0], pos);
        }
        uint64_t len = e.len;
        if (e.layer == s->n) {
            /* Nobody above base decides this range: base already holds it. */
        } else if (e.flags & CT_STATUS_ZERO) {
            len = CT_MIN(len, ZERO_STEP);
            r = flush_run(job, s);
            if (r == 0) {
                r = job_pipe_put_zero(&s->pipe, len, pos);
            }
            if (r < 0) {
                return r;
            }
        } else {
            if (s->run_len && (s->run_off + s->run_len != pos || s->run_len == bufsz)) {
                r = flush_run(job, s);
                if (r < 0) {
                    return r;
                }
            }
            if (!s->run_len) {
                s->run_off = pos;
                if (!s->cur && !(s->cur = job_pipe_buf(&s->pipe))) {
                    return -EIO; /* the pipeline failed */
                }
            }
            len = CT_MIN(len, bufsz - s->run_len);
            r = ct_image_pread(s->layers[e.layer], s->cur + s->run_len, len, pos);
            if (r < 0) {
                return job_io_error(err, r, "reading", s->layers[e.layer], pos);
            }
            s->run_len += len;
        }
        pos += len;
        job_progress_update(job, len);
    }
    return flush_run(job, s);
}

static int commit_run(struct ct_job *job, struct ct_err *err)
{
    struct commit_state *s = job_opaque(job);
    uint64_t size = ct_image_size(s->layers[0]);
    job_progress_set_total(job, size);
    job_write_behind(job, s->base);
    if (ct_image_size(s->base) < size) {
        int r = ct_image_truncate(s->base, size, false, err);
        if (r < 0) {
            ct_err_prefix(err, "Could not grow the base image '%s': ", ct_image_filename(s->base));
            return r;
        }
    }
    int r = job_pipe_init(&s->pipe, job, s->base, &commit_pipe_ops, s, job_buf_bytes(job), err);
    if (r < 0) {
        return r;
    }
    /* Whatever happened, what was queued reaches base before anyone else touches it. */
    r = job_pipe_finish(&s->pipe, copy_layers(job, s, size, err), err);
    s->cur = NULL;
    if (r < 0) {
        return r;
    }
    r = ct_image_flush(s->base);
    return r < 0 ? job_io_error(err, r, "writing to", s->base, size) : 0;
}

static int commit_prepare(struct ct_job *job, struct ct_err *err)
{
    struct commit_state *s = job_opaque(job);
    int r = ct_image_flush(s->base);
    if (r < 0) {
        return ct_err_set(err, r, "error while flushing '%s': %s", ct_image_filename(s->base),
                          ct_strerror(r));
    }
    for (unsigned i = 0; i < s->nb_overlays; i++) {
        r = ct_image_change_backing(s->overlays[i], s->ov_backing, s->ov_fmt, err);
        if (r == 0) {
            r = ct_image_flush(s->overlays[i]);
        }
        if (r < 0) {
            ct_err_prefix(err, "%s: ", ct_image_filename(s->overlays[i]));
            return r;
        }
    }
    if (s->empty_top) {
        r = ct_image_make_empty(s->layers[0], err);
        if (r == 0) {
            r = ct_image_flush(s->layers[0]);
        }
        if (r < 0) {
            ct_err_prefix(err, "%s: ", ct_image_filename(s->layers[0]));
            return r;
        }
    }
    return 0;
}

static void commit_abort(struct ct_job *job)
{
    struct commit_state *s = job_opaque(job);
    /* Whatever reached base is hidden from the top (C1); make it durable all the same. */
    (void)ct_image_flush(s->base);
}

static void commit_free(struct ct_job *job)
{
    struct commit_state *s = job_opaque(job);
    if (!s) {
        return;
    }
    free(s->layers);
    free(s->overlays);
    free(s->ov_backing);
    free(s->ov_fmt);
    free(s);
}

static const struct job_driver commit_driver = {
    .type = "commit",
    .run = commit_run,
    .prepare = commit_prepare,
    .abort = commit_abort,
    .free = commit_free,
};

int ct_job_commit_create(struct ct_job **out, const struct ct_commit_opts *o,
                         const struct ct_job_opts *jo, struct ct_err *err)
{
    *out = NULL;
    if (!o->nb_layers || !o->layers || !o->base) {
        return ct_err_set(err, -EINVAL, "commit needs at least one layer above the base");
    }
    if (o->nb_overlays && (!o->overlay_backing || !o->overlay_backing_fmt)) {
        return ct_err_set(err, -EINVAL, "overlays to rebase need a backing name and format");
    }
    struct commit_state *s = calloc(1, sizeof(*s));
    if (!s) {
        return ct_err_set(err, -ENOMEM, "out of memory");
    }
    s->n = o->nb_layers;
    s->base = o->base;
    s->empty_top = o->empty_top;
    s->nb_overlays = o->nb_overlays;
    s->layers = calloc(o->nb_layers, sizeof(*s->layers));
    s->overlays = calloc(o->nb_overlays + 1, sizeof(*s->overlays));
    s->ov_backing = o->overlay_backing ? strdup(o->overlay_backing) : NULL;
    s->ov_fmt = o->overlay_backing_fmt ? strdup(o->overlay_backing_fmt) : NULL;
    if (!s->layers || !s->overlays || (o->overlay_backing && !s->ov_backing) ||
        (o->overlay_backing_fmt && !s->ov_fmt)) {
        free(s->layers);
        free(s->overlays);
        free(s->ov_backing);
        free(s->ov_fmt);
        free(s);
        return ct_err_set(err, -ENOMEM, "out of memory");
    }
    memcpy(s->layers, o->layers, o->nb_layers * sizeof(*s->layers));
    if (o->nb_overlays) {
        memcpy(s->overlays, o->overlays, o->nb_overlays * sizeof(*s->overlays));
    }
    return job_create(out, &commit_driver, s, jo, err);
}
