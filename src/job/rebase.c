/*
 * Safe rebase, and the "diff copy" it is built on (also used by convert -B).
 *
 * A diff copy makes a target, which will read through chain NEW afterwards, show what chain
 * OLD shows now: wherever the two views differ (in ranges the target does not allocate
 * itself, for rebase), OLD's bytes are written into the target.
 *
 * Cost follows the differing allocation, not the virtual size (qemu-facts 4, item 4):
 *  - the two chains' common ancestor is found by file identity (the topmost layer of OLD that
 *    is also in NEW with the same chain below it); ranges that neither chain allocates above it
 *    read the same in both and are skipped from metadata alone;
 *  - ranges both chains know to be zero (ZERO clusters, past a shorter layer's end, or not
 *    allocated anywhere in a chain with no common ancestor) are skipped too;
 *  - the remaining candidates are read from both chains and compared one allocation unit of
 *    the target at a time; only differing units are written, whole and aligned (no COW reads),
 *    as data, or as zeros that stay zeros after the link changes (job_write_zeroes_hiding).
 *
 * Invariants:
 *  R1. Writes carry OLD's bytes into units the target does not allocate: the target's view is
 *      unchanged at every instant (it reads OLD there now), so a failure, cancel or kill leaves
 *      the target reading as before, still linked to OLD.
 *  R2. Units are the target's allocation unit, grown only inside target-unallocated extents,
 *      which block status reports unit-aligned.
 *  R3. The link changes last, after a flush (rebase prepare).
 *
 * With compress (rebase -c, convert -B -c), the whole clusters written go through
 * ct_image_pwrite_compressed() (with extended L2, clusters only partly written stay
 * uncompressed subclusters); what the target allocated before is left as it
 * is, and zero units stay zero clusters (QEMU 8.2's rebase -c: only what is copied from
 * the old backing chain is compressed).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "job/chain.h"
#include "job/job-int.h"
#include "util/err.h"
#include "util/misc.h"

struct chain_list {
    struct ct_image **layers;
    unsigned len;   /* layers in the chain */
    unsigned above; /* layers above the common ancestor (== len when none) */
    dev_t *dev;
    ino_t *ino;
    bool *ok; /* stat succeeded */
};

static void chain_list_free(struct chain_list *c)
{
    free(c->layers);
    free(c->dev);
    free(c->ino);
    free(c->ok);
}

static int chain_list_init(struct chain_list *c, struct ct_image *top)
{
    memset(c, 0, sizeof(*c));
    unsigned n = 0;
    for (struct ct_image *l = top; l; l = ct_image_backing(l)) {
        n++;
    }
    c->layers = calloc(n + 1, sizeof(*c->layers));
    c->dev = calloc(n + 1, sizeof(*c->dev));
    c->ino = calloc(n + 1, sizeof(*c->ino));
    c->ok = calloc(n + 1, sizeof(*c->ok));
    if (!c->layers || !c->dev || !c->ino || !c->ok) {
        chain_list_free(c);
        return -ENOMEM;
    }
    unsigned i = 0;
    for (struct ct_image *l = top; l; l = ct_image_backing(l), i++) {
        struct stat st;
        c->layers[i] = l;
        if (stat(ct_image_filename(l), &st) == 0) {
            c->dev[i] = st.st_dev;
            c->ino[i] = st.st_ino;
            c->ok[i] = true;
        }
    }
    c->len = c->above = n;
    return 0;
}

static bool same_layer(const struct chain_list *a, unsigned i, const struct chain_list *b,
                       unsigned j)
{
    return a->ok[i] && b->ok[j] && a->dev[i] == b->dev[j] && a->ino[i] == b->ino[j] &&
           ct_image_size(a->layers[i]) == ct_image_size(b->layers[j]);
}

/* The topmost layer of a that is in b with an identical chain below it. */
static void find_common(struct chain_list *a, struct chain_list *b)
{
    for (unsigned i = 0; i < a->len; i++) {
        for (unsigned j = 0; j < b->len; j++) {
            if (a->len - i != b->len - j) {
                continue;
            }
            unsigned k = 0;
            while (i + k < a->len && same_layer(a, i + k, b, j + k)) {
                k++;
            }
            if (i + k == a->len) {
                a->above = i;
                b->above = j;
                return;
            }
        }
    }
}

struct diff_state {
    const struct job_diff *d;
    struct chain_list old, nw;
    bool has_common;
    uint64_t unit, bufsz;
    uint8_t *obuf, *nbuf, *zbuf;
    uint64_t run_off, run_end; /* candidate run being gathered */
    uint64_t done_end;         /* everything below was processed */
};

/* Write OLD's bytes [off, off+len) (unit-aligned) into the target; with compress, every whole
 * cluster in it (or the image's last, partial one) compressed. With extended L2 the units are
 * subclusters: a cluster is compressed only when the range covers all of it, which means none
 * of its subclusters was allocated in the target (R2: runs lie in target-unallocated extents);
 * the pieces of clusters at the range's ends are written as they are. */
static int write_data(struct diff_state *s, const uint8_t *buf, uint64_t len, uint64_t off)
{
    struct ct_image *t = s->d->target;
    uint64_t cs = ct_image_cluster_size(t);
    if (!s->d->compress || !cs) {
        return ct_image_pwrite(t, buf, len, off, 0);
    }
    uint64_t size = ct_image_size(t), end = off + len;
    for (uint64_t p = off; p < end;) {
        uint64_t cend = CT_MIN(ct_align_down(p, cs) + cs, size);
        uint64_t n = CT_MIN(cend, end) - p;
        bool whole = p % cs == 0 && p + n == cend;
        int r = whole ? ct_image_pwrite_compressed(t, buf + (p - off), n, p)
                      : ct_image_pwrite(t, buf + (p - off), n, p, 0);
        if (r < 0) {
            return r;
        }
        p += n;
    }
    return 0;
}

/* Compare a run unit by unit; write OLD's bytes where the views differ. */
static int flush_run(struct ct_job *job, struct diff_state *s, struct ct_err *err)
{
    if (s->run_end <= s->run_off) {
        return 0;
    }
    uint64_t off = s->run_off, len = s->run_end - s->run_off;
    s->done_end = s->run_end;
    s->run_off = s->run_end = 0;
    struct ct_image *old_top = s->old.len ? s->old.layers[0] : NULL;
    struct ct_image *new_top = s->nw.len ? s->nw.layers[0] : NULL;
    int r = job_read_view(old_top, s->obuf, len, off);
    if (r < 0) {
        return job_io_error(err, r, "reading", old_top, off);
    }
    r = job_read_view(new_top, s->nbuf, len, off);
    if (r < 0) {
        return job_io_error(err, r, "reading", new_top, off);
    }
    struct ct_image *t = s->d->target;
    uint64_t written = 0;
    /* Pending write: [ws, we) of kind data (true) or zero (false). */
    uint64_t ws = 0, we = 0;
    bool wdata = false;
    for (uint64_t u = 0;; u += s->unit) {
        bool end = u >= len;
        uint64_t ul = end ? 0 : CT_MIN(s->unit, len - u);
        bool differs = ul && memcmp(s->obuf + u, s->nbuf + u, ul) != 0;
        bool data = differs && !job_is_zero(s->obuf + u, ul);
        if (we > ws && (!differs || data != wdata || we != u)) {
            r = wdata ? write_data(s, s->obuf + ws, we - ws, off + ws)
                      : job_write_zeroes_hiding(t, we - ws, off + ws, s->zbuf, s->bufsz);
            if (r < 0) {
                return job_io_error(err, r, "writing to", t, off + ws);
            }
            written += we - ws;
            ws = we = 0;
        }
        if (differs) {
            if (we == ws) {
                ws = u;
                wdata = data;
            }
            we = u + ul;
        }
        if (end) {
            break;
        }
    }
    return job_ratelimit(job, written);
}

/* Add candidate [p, p+len) (inside target-unallocated [seg_s, seg_e)), grown to whole units
 * (R2). Sets *consumed to how much of it the run took (the buffer may fill up first). */
static int add_candidate(struct ct_job *job, struct diff_state *s, uint64_t p, uint64_t len,
                         uint64_t seg_s, uint64_t seg_e, uint64_t *consumed, struct ct_err *err)
{
    *consumed = len;
    uint64_t cs = CT_MAX(CT_MAX(ct_align_down(p, s->unit), seg_s), s->done_end);
    uint64_t ce = CT_MIN(ct_align_up(p + len, s->unit), seg_e);
    if (cs >= ce) {
        return 0; /* already covered by a flushed run */
    }
    if (s->run_end > s->run_off && cs > s->run_end) {
        int r = flush_run(job, s, err);
        if (r < 0) {
            return r;
        }
    }
    if (s->run_end <= s->run_off) {
        s->run_off = s->run_end = cs;
    }
    uint64_t lim = s->run_off + s->bufsz;
    s->run_end = CT_MAX(s->run_end, CT_MIN(ce, lim));
    if (ce <= lim) {
        return 0;
    }
    *consumed = lim > p ? lim - p : 0;
    return flush_run(job, s, err);
}

static int diff_segment(struct ct_job *job, struct diff_state *s, uint64_t seg_s, uint64_t seg_e,
                        struct ct_err *err)
{
    for (uint64_t p = seg_s; p < seg_e;) {
        int r = job_pause_point(job);
        if (r < 0) {
            return r;
        }
        struct job_extent o, n;
        r = job_chain_status(s->old.layers, s->old.above, p, seg_e - p, &o);
        if (r < 0) {
            return job_io_error(err, r, "reading the allocation of", s->old.layers[0], p);
        }
        r = job_chain_status(s->nw.layers, s->nw.above, p, o.len, &n);
        if (r < 0) {
            return job_io_error(err, r, "reading the allocation of", s->nw.layers[0], p);
        }
        uint64_t len = CT_MIN(o.len, n.len);
        bool o_common = o.layer == s->old.above && s->has_common;
        bool n_common = n.layer == s->nw.above && s->has_common;
        bool o_zero = (o.flags & CT_STATUS_ZERO) || (o.layer == s->old.above && !s->has_common);
        bool n_zero = (n.flags & CT_STATUS_ZERO) || (n.layer == s->nw.above && !s->has_common);
        uint64_t consumed = len;
        if (!(o_common && n_common) && !(o_zero && n_zero)) {
            r = add_candidate(job, s, p, len, seg_s, seg_e, &consumed, err);
            if (r < 0) {
                return r;
            }
        }
        p += consumed;
        job_progress_update(job, consumed);
    }
    return 0;
}

int job_diff_run(struct ct_job *job, const struct job_diff *d, struct ct_err *err)
{
    struct diff_state s = {.d = d};
    struct ct_image *t = d->target;
    uint64_t size = ct_image_size(t);
    int r = chain_list_init(&s.old, d->old_top);
    if (r == 0) {
        r = chain_list_init(&s.nw, d->new_top);
    }
    if (r < 0) {
        chain_list_free(&s.old);
        return ct_err_set(err, r, "out of memory");
    }
    find_common(&s.old, &s.nw);
    s.has_common = s.old.above < s.old.len;
    s.unit = job_alloc_unit(t);
    s.bufsz = CT_MAX(ct_align_up(job_buf_bytes(job), s.unit), s.unit);
    s.obuf = job_buf_alloc(s.bufsz);
    s.nbuf = job_buf_alloc(s.bufsz);
    s.zbuf = job_buf_alloc(s.bufsz);
    if (!s.obuf || !s.nbuf || !s.zbuf) {
        r = ct_err_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    memset(s.zbuf, 0, s.bufsz);
    for (uint64_t pos = 0; pos < size;) {
        uint64_t len = CT_MIN(size - pos, JOB_STATUS_STEP);
        bool skip = false;
        if (d->skip_target_allocated) {
            struct ct_extent e;
            r = ct_image_block_status(t, pos, len, &e);
            if (r == 0 && e.len == 0) {
                r = -EIO;
            }
            if (r < 0) {
                r = job_io_error(err, r, "reading the allocation of", t, pos);
                goto out;
            }
            len = e.len;
            skip = (e.flags & CT_STATUS_ALLOCATED) != 0;
        }
        if (skip) {
            job_progress_update(job, len);
        } else {
            r = diff_segment(job, &s, pos, pos + len, err);
        }
        if (r < 0) {
            goto out;
        }
        pos += len;
    }
    r = flush_run(job, &s, err);
    if (r == 0) {
        r = ct_image_flush(t);
        if (r < 0) {
            r = job_io_error(err, r, "flushing", t, 0);
        }
    }
out:
    free(s.obuf);
    free(s.nbuf);
    free(s.zbuf);
    chain_list_free(&s.old);
    chain_list_free(&s.nw);
    return r;
}

/* ---- the rebase job ---- */

struct rebase_state {
    struct ct_image *img, *new_backing;
    char *backing, *fmt;
    bool compress;
};

static int rebase_run(struct ct_job *job, struct ct_err *err)
{
    struct rebase_state *s = job_opaque(job);
    job_progress_set_total(job, ct_image_size(s->img));
    job_write_behind(job, s->img);
    struct job_diff d = {
        .target = s->img,
        .skip_target_allocated = true,
        .old_top = ct_image_backing(s->img),
        .new_top = s->new_backing,
        .compress = s->compress,
    };
    return job_diff_run(job, &d, err);
}

static int rebase_prepare(struct ct_job *job, struct ct_err *err)
{
    struct rebase_state *s = job_opaque(job);
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

static void rebase_abort(struct ct_job *job)
{
    struct rebase_state *s = job_opaque(job);
    (void)ct_image_flush(s->img);
}

static void rebase_free(struct ct_job *job)
{
    struct rebase_state *s = job_opaque(job);
    if (s) {
        free(s->backing);
        free(s->fmt);
        free(s);
    }
}

static const struct job_driver rebase_driver = {
    .type = "rebase",
    .run = rebase_run,
    .prepare = rebase_prepare,
    .abort = rebase_abort,
    .free = rebase_free,
};

int ct_job_rebase_create(struct ct_job **out, const struct ct_rebase_opts *o,
                         const struct ct_job_opts *jo, struct ct_err *err)
{
    *out = NULL;
    bool link = o->backing && *o->backing;
    if (link && !o->backing_fmt) {
        return ct_err_set(err, -EINVAL, "a backing file needs a format");
    }
    if (link && !o->new_backing) {
        return ct_err_set(err, -EINVAL, "safe rebase needs the new backing file open");
    }
    struct rebase_state *s = calloc(1, sizeof(*s));
    if (!s) {
        return ct_err_set(err, -ENOMEM, "out of memory");
    }
    if (o->compress && strcmp(ct_image_format(o->img), "qcow2") != 0) {
        free(s);
        return ct_err_set(err, -CT_E_UNSUPPORTED, "Compression not supported for this file format");
    }
    s->compress = o->compress;
    s->img = o->img;
    s->new_backing = link ? o->new_backing : NULL;
    s->backing = link ? strdup(o->backing) : NULL;
    s->fmt = link ? strdup(o->backing_fmt) : NULL;
    if (link && (!s->backing || !s->fmt)) {
        free(s->backing);
        free(s->fmt);
        free(s);
        return ct_err_set(err, -ENOMEM, "out of memory");
    }
    return job_create(out, &rebase_driver, s, jo, err);
}
