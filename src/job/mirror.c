/*
 * The mirror job (QEMU drive-mirror/blockdev-mirror; also the engine of an active commit):
 * make a target show the guest view of a source that keeps being written.
 *
 * A dirty bitmap with one bit per granule (64 KiB) says what the target still lacks. It
 * starts with what the chosen sync mode copies and every write reported by
 * ct_job_mirror_note_write() sets more bits. The job clears a run of bits and copies that run
 * in the same critical section (the caller's io lock, which guest writes also take), so a
 * write either lands before the copy reads (and is copied) or after it (and sets the bits
 * again): nothing is missed.
 *
 * Invariants:
 *  M1. Bitmap and copies are only touched with the io lock held (the job's run, prepare and
 *      note_write all hold it).
 *  M2. Once the bitmap is empty the target reads exactly as the source (READY). It stays so
 *      while READY by copying new writes whenever the job is woken.
 *  M3. The pivot callback runs only after a final copy of what is left and a flush of the
 *      target, with the io lock held, so no guest request sees a state in between.
 *  M4. The source is never written by the job; for an active commit (target = a layer of the
 *      source's chain) only ranges that layers above it decide are written, so the source's
 *      view does not change either.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "job/chain.h"
#include "job/job-int.h"
#include "util/err.h"
#include "util/misc.h"

#define GRANULE    (64u << 10)
#define READY_POLL 100000000ull /* ns: a READY job looks for new writes at least this often */
#define MAX_LAYERS 4096

struct mirror_state {
    struct ct_image *src, *target, *base;
    bool sync_none, target_is_zero;
    int (*pivot)(void *opaque, struct ct_err *err);
    void *pivot_opaque;
    uint64_t size;     /* source size when the job was made (the bitmap's extent) */
    uint64_t nbits;    /* granules */
    uint64_t *bitmap;  /* 1 = the target may differ from the source there */
    uint64_t ndirty;   /* bits set */
    uint64_t cursor;   /* where the copy loop looks next */
    bool pivot_wanted; /* run ended on complete: prepare pivots */
    uint8_t *buf, *zbuf;
};

static void set_bits(struct mirror_state *s, uint64_t first, uint64_t last)
{
    for (uint64_t b = first; b <= last && b < s->nbits; b++) {
        uint64_t m = 1ull << (b & 63);
        if (!(s->bitmap[b >> 6] & m)) {
            s->bitmap[b >> 6] |= m;
            s->ndirty++;
        }
    }
}

static void mark_dirty(struct mirror_state *s, uint64_t off, uint64_t len)
{
    if (len == 0 || off >= s->size) {
        return;
    }
    uint64_t end = CT_MIN(off + len, s->size);
    set_bits(s, off / GRANULE, (end - 1) / GRANULE);
}

/* Next dirty granule at or after from (wrapping); returns false when none. */
static bool next_dirty(struct mirror_state *s, uint64_t from, uint64_t *out)
{
    if (!s->ndirty) {
        return false;
    }
    for (uint64_t i = 0; i < s->nbits; i++) {
        uint64_t b = (from + i) % s->nbits;
        if ((b & 63) == 0 && s->bitmap[b >> 6] == 0 && b + 64 <= s->nbits && i + 64 <= s->nbits) {
            i += 63;
            continue;
        }
        if (s->bitmap[b >> 6] & (1ull << (b & 63))) {
            *out = b;
            return true;
        }
    }
    return false;
}

/* The initial bitmap: what the sync mode copies. */
static int initial_dirty(struct mirror_state *s, struct ct_err *err)
{
    if (s->sync_none) {
        return 0;
    }
    struct ct_image *layers[MAX_LAYERS];
    unsigned n = 0;
    for (struct ct_image *l = s->src; l && l != s->base; l = ct_image_backing(l)) {
        if (n == MAX_LAYERS) {
            return ct_err_set(err, -E2BIG, "backing chain too deep to mirror");
        }
        layers[n++] = l;
    }
    for (uint64_t pos = 0; pos < s->size;) {
        struct job_extent e;
        int r = job_chain_status(layers, n, pos, CT_MIN(s->size - pos, JOB_STATUS_STEP), &e);
        if (r < 0) {
            return job_io_error(err, r, "reading the allocation of", s->src, pos);
        }
        bool copy;
        if (e.layer < n) {
            /* Decided above base. Zeros over a zero target need no copy (full sync only). */
            copy = !(s->target_is_zero && !s->base && (e.flags & CT_STATUS_ZERO));
        } else {
            /* Below base (the target has it) or, with no base, unallocated anywhere. */
            copy = !s->base && !s->target_is_zero;
        }
        if (copy) {
            mark_dirty(s, pos, e.len);
        }
        pos += e.len;
    }
    return 0;
}

/* Copy one run of dirty granules starting at granule b (io lock held). Returns bytes done. */
static int copy_run(struct ct_job *job, struct mirror_state *s, uint64_t b, uint64_t *done,
                    struct ct_err *err)
{
    uint64_t bufsz = job_buf_bytes(job);
    uint64_t max = CT_MAX(bufsz / GRANULE, 1);
    uint64_t n = 0;
    while (b + n < s->nbits && n < max && (s->bitmap[(b + n) >> 6] & (1ull << ((b + n) & 63)))) {
        s->bitmap[(b + n) >> 6] &= ~(1ull << ((b + n) & 63));
        n++;
    }
    s->ndirty -= n;
    uint64_t off = b * GRANULE;
    uint64_t len = CT_MIN(n * GRANULE, s->size - off);
    int r = job_read_view(s->src, s->buf, len, off);
    if (r < 0) {
        set_bits(s, b, b + n - 1);
        return job_io_error(err, r, "reading", s->src, off);
    }
    if (job_is_zero(s->buf, len)) {
        r = job_write_zeroes_hiding(s->target, len, off, s->zbuf, bufsz);
    } else {
        r = ct_image_pwrite(s->target, s->buf, len, off, 0);
    }
    if (r < 0) {
        set_bits(s, b, b + n - 1);
        return job_io_error(err, r, "writing to", s->target, off);
    }
    s->cursor = b + n;
    *done = len;
    return 0;
}

/* Copy until the bitmap is empty. With throttle, pause points and the rate limit apply
 * between runs (the io lock is dropped there); without, it runs to the end holding it. */
static int drain(struct ct_job *job, struct mirror_state *s, bool throttle, struct ct_err *err)
{
    uint64_t b;
    while (next_dirty(s, s->cursor, &b)) {
        if (throttle) {
            int r = job_pause_point(job);
            if (r < 0) {
                return r;
            }
            if (!next_dirty(s, s->cursor, &b)) {
                break; /* (the bitmap may have changed while the lock was dropped) */
            }
        }
        uint64_t done = 0;
        int r = copy_run(job, s, b, &done, err);
        if (r < 0) {
            return r;
        }
        job_progress_update(job, done);
        if (throttle && (r = job_ratelimit(job, done)) < 0) {
            return r;
        }
    }
    return 0;
}

static int mirror_run(struct ct_job *job, struct ct_err *err)
{
    struct mirror_state *s = job_opaque(job);
    uint64_t bufsz = job_buf_bytes(job);
    job_write_behind(job, s->target);
    s->buf = job_buf_alloc(bufsz);
    s->zbuf = calloc(1, bufsz);
    if (!s->buf || !s->zbuf) {
        return ct_err_set(err, -ENOMEM, "out of memory");
    }
    if (ct_image_size(s->target) < s->size) {
        int r = ct_image_truncate(s->target, s->size, false, err);
        if (r < 0) {
            ct_err_prefix(err, "Could not grow '%s': ", ct_image_filename(s->target));
            return r;
        }
    }
    int r = initial_dirty(s, err);
    if (r < 0) {
        return r;
    }
    job_progress_set_total(job, s->ndirty * GRANULE);
    for (;;) {
        r = drain(job, s, true, err);
        if (r < 0) {
            return r;
        }
        /* READY means in sync, not durable (as QEMU): the flush comes before the pivot. */
        r = job_ready_wait_timeout(job, READY_POLL);
        if (r == 2) {
            continue; /* woken by writes, or time to look: copy them and wait again */
        }
        if (r < 0) {
            return r;
        }
        /* Complete (0) or a soft cancel (1): both leave the target in sync, now. */
        s->pivot_wanted = r == 0;
        r = drain(job, s, false, err);
        if (r == 0 && (r = ct_image_flush(s->target)) < 0) {
            r = job_io_error(err, r, "flushing", s->target, 0);
        }
        return r;
    }
}

static int mirror_prepare(struct ct_job *job, struct ct_err *err)
{
    struct mirror_state *s = job_opaque(job);
    if (!s->pivot_wanted) {
        return 0;
    }
    /* With manual finalize, writes may have come in since run ended (M3). */
    int r = drain(job, s, false, err);
    if (r == 0 && (r = ct_image_flush(s->target)) < 0) {
        r = job_io_error(err, r, "flushing", s->target, 0);
    }
    if (r == 0 && s->pivot) {
        r = s->pivot(s->pivot_opaque, err);
    }
    return r;
}

static void mirror_abort(struct ct_job *job)
{
    struct mirror_state *s = job_opaque(job);
    (void)ct_image_flush(s->target);
}

static void mirror_clean(struct ct_job *job)
{
    struct mirror_state *s = job_opaque(job);
    free(s->buf);
    free(s->zbuf);
    s->buf = s->zbuf = NULL;
}

static void mirror_free(struct ct_job *job)
{
    struct mirror_state *s = job_opaque(job);
    if (!s) {
        return;
    }
    free(s->buf);
    free(s->zbuf);
    free(s->bitmap);
    free(s);
}

static const struct job_driver mirror_driver = {
    .type = "mirror",
    .run = mirror_run,
    .prepare = mirror_prepare,
    .abort = mirror_abort,
    .clean = mirror_clean,
    .free = mirror_free,
};

int ct_job_mirror_create(struct ct_job **out, const struct ct_mirror_opts *o,
                         const struct ct_job_opts *jo, struct ct_err *err)
{
    *out = NULL;
    if (!o->src || !o->target) {
        return ct_err_set(err, -EINVAL, "mirror needs a source and a target");
    }
    if (o->src == o->target) {
        return ct_err_set(err, -EINVAL, "cannot mirror an image onto itself");
    }
    if (o->base) {
        struct ct_image *l = ct_image_backing(o->src);
        while (l && l != o->base) {
            l = ct_image_backing(l);
        }
        if (!l) {
            return ct_err_set(err, -EINVAL, "'%s' is not in the backing chain of '%s'",
                              ct_image_filename(o->base), ct_image_filename(o->src));
        }
    }
    struct mirror_state *s = calloc(1, sizeof(*s));
    if (!s) {
        return ct_err_set(err, -ENOMEM, "out of memory");
    }
    s->src = o->src;
    s->target = o->target;
    s->base = o->base;
    s->sync_none = o->sync_none;
    s->target_is_zero = o->target_is_zero;
    s->pivot = o->pivot;
    s->pivot_opaque = o->pivot_opaque;
    s->size = ct_image_size(o->src);
    s->nbits = (s->size + GRANULE - 1) / GRANULE;
    s->bitmap = calloc(s->nbits / 64 + 1, sizeof(uint64_t));
    if (!s->bitmap) {
        free(s);
        return ct_err_set(err, -ENOMEM, "out of memory");
    }
    return job_create(out, &mirror_driver, s, jo, err);
}

void ct_job_mirror_note_write(struct ct_job *job, uint64_t off, uint64_t len)
{
    struct mirror_state *s = job_opaque(job);
    uint64_t before = s->ndirty;
    mark_dirty(s, off, len);
    if (s->ndirty != before) {
        job_progress_add_total(job, (s->ndirty - before) * GRANULE);
        job_kick(job);
    }
}
