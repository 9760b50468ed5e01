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
 *  - Parallel copy (nb_workers >= 2, convert -m): see "Parallel copy" below.
 *
 * Invariant P1: sources are only read; a failure leaves them untouched and the target valid
 * (partly written).
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

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
    unsigned nb_workers;
    int (*open_src)(void *opaque, unsigned src_index, struct ct_image **out, struct ct_err *err);
    void *open_opaque;
    unsigned max_readers;
    bool out_of_order, copy_offload;
    /* Parallel copy to a raw target: held around every write of the target, which worker
     * threads make themselves (see "Parallel copy"); NULL otherwise. */
    pthread_mutex_t *dst_lock;
};

static void dst_lock(struct copy_state *s)
{
    if (s->dst_lock) {
        pthread_mutex_lock(s->dst_lock);
    }
}

static void dst_unlock(struct copy_state *s)
{
    if (s->dst_lock) {
        pthread_mutex_unlock(s->dst_lock);
    }
}

static int write_zeroes_locked(struct copy_state *s, uint64_t len, uint64_t off)
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

static int write_zeroes(struct copy_state *s, uint64_t len, uint64_t off)
{
    dst_lock(s);
    int r = write_zeroes_locked(s, len, off);
    dst_unlock(s);
    return r;
}

/* Write buf (len bytes for dst offset off), leaving zero runs of min_sparse bytes or more
 * (none with copy offloading, which writes data as it is). Adds the data bytes written to
 * *written. Calls nothing of the job: it runs in worker threads too. */
static int write_sparse(struct copy_state *s, const uint8_t *buf, uint64_t len, uint64_t off,
                        uint64_t *written, struct ct_err *err)
{
    uint64_t i = 0;
    while (i < len) {
        /* Data up to the next zero run long enough to skip. */
        uint64_t ds = i, zs = i, ze = i;
        bool found = false;
        if (s->min_sparse && !s->copy_offload) {
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
            dst_lock(s);
            int r = ct_image_pwrite(s->dst, buf + ds, zs - ds, off + ds, 0);
            dst_unlock(s);
            if (r < 0) {
                return job_io_error(err, r, "writing to", s->dst, off + ds);
            }
            *written += zs - ds;
        }
        if (ze > zs) {
            int r = write_zeroes(s, ze - zs, off + zs);
            if (r < 0) {
                return job_io_error(err, r, "writing to", s->dst, off + zs);
            }
        }
        i = ze;
    }
    return 0;
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
            if (s->copy_offload && ct_image_copy_range(src, pos, s->dst, dst_off + pos, len) == 0) {
                r = job_ratelimit(job, len);
                if (r < 0) {
                    return r;
                }
                pos += len;
                job_progress_update(job, len);
                continue;
            }
            r = ct_image_pread(src, s->buf, len, pos);
            if (r < 0) {
                return job_io_error(err, r, "reading", src, pos);
            }
            uint64_t written = 0;
            r = write_sparse(s, s->buf, len, dst_off + pos, &written, err);
            if (r == 0) {
                r = job_ratelimit(job, written);
            }
            if (r < 0) {
                return r;
            }
        }
        pos += len;
        job_progress_update(job, len);
    }
    return 0;
}

/*
 * Parallel copy (convert -m N, N >= 2).
 *
 * The job's thread walks the sources' allocation (on srcs[], the handles the job was given)
 * and cuts the copy into items of at most the buffer size: a zero range or a data range.
 * Worker threads take queued items; each reads through its own handles of the sources, which
 * it opens when it starts (open_src), since a struct ct_image is not thread-safe. Workers are
 * started one at a time, and only when the job's thread is about to wait while items are
 * queued, no worker is idle and none is still starting: when reading is what holds the copy
 * back. Readers for a qcow2 target are also capped at the number of CPUs less one (they
 * compete with the writer for CPU), so a deep chain is not opened eight more times for
 * nothing; workers for a raw target write it themselves, one at a time, and are capped at the
 * number of CPUs. What happens to a read item depends on the target:
 *  - raw target: the worker writes the item itself through the one target handle, one worker
 *    at a time (dst_lock), while the others read. Filesystems take a file's lock exclusively
 *    for every buffered write, so writes made together only wait for each other in the
 *    kernel, spinning while the holder copies: measured on a 2 GiB convert -O raw -t unsafe
 *    with 8 writers, 13-30% of the CPU time went to rwsem_spin_on_owner and the copy took
 *    7 s of CPU against qemu-img's 2.3 s. A raw file has no allocation order, so raw writes go
 *    out as they complete (with or without -W).
 *  - qcow2 target: the job's thread is the single writer and owns the target handle. Items
 *    wait, read, in a bounded set of slots (readers + 2 buffers) and are written in
 *    ascending guest order, so host clusters are allocated in guest order as in a sequential
 *    copy; with out_of_order (-W) any read item is written as soon as it is ready.
 * Progress, the rate limit, pause and cancel stay in the job's thread: it accounts an item
 * when it completes, and stops handing out items while paused. The first error stops the
 * workers (they finish their current item), and the job fails with that item's message.
 *
 * Slot states: FREE -> QUEUED (job thread) -> RUNNING (worker) -> DONE (worker) -> FREE (job
 * thread, after writing it for a qcow2 target). Zero items that need no worker (all zero
 * items for a qcow2 target, and for a raw target that already reads zero) go FREE -> DONE.
 */
enum slot_state { SLOT_FREE, SLOT_QUEUED, SLOT_RUNNING, SLOT_DONE };

struct copy_slot {
    enum slot_state state;
    uint64_t seq;
    unsigned src;
    uint64_t src_off, dst_off, len;
    bool zero;
    uint8_t *buf;
    uint64_t written; /* data bytes written by the worker (rate limit) */
    int r;
    struct ct_err err;
};

struct copy_par {
    struct copy_state *s;
    bool raw_dst;
    unsigned nslots;
    struct copy_slot *slots;
    uint64_t bufsz;
    pthread_mutex_t lock;
    pthread_cond_t work; /* an item was queued, or stop */
    pthread_cond_t done; /* an item completed, a worker is up, or a worker failed */
    bool stop;
    unsigned idle;     /* workers waiting for an item */
    unsigned starting; /* workers opening their handles */
    int fatal;         /* a worker could not start: fatal_err says why */
    struct ct_err fatal_err;
};

struct copy_worker {
    struct copy_par *p;
    struct ct_image **srcs; /* its own handles, one per source */
    pthread_t tid;
};

/* Read (and for a raw target write) one item in a worker. */
static int par_process(struct copy_par *p, struct copy_slot *sl, struct copy_worker *wk)
{
    struct copy_state *s = p->s;
    struct ct_image *src = wk->srcs[sl->src];
    if (sl->zero) {
        int r = write_zeroes(s, sl->len, sl->dst_off);
        return r < 0 ? job_io_error(&sl->err, r, "writing to", s->dst, sl->dst_off) : 0;
    }
    if (s->copy_offload && p->raw_dst) {
        dst_lock(s);
        int r = ct_image_copy_range(src, sl->src_off, s->dst, sl->dst_off, sl->len);
        dst_unlock(s);
        if (r == 0) {
            sl->written = sl->len;
            return 0;
        }
        /* Not raw to raw, or the kernel cannot: copy the bytes ourselves. */
    }
    if (!sl->buf && !(sl->buf = job_buf_alloc(p->bufsz))) {
        return ct_err_set(&sl->err, -ENOMEM, "out of memory");
    }
    int r = ct_image_pread(src, sl->buf, sl->len, sl->src_off);
    if (r < 0) {
        return job_io_error(&sl->err, r, "reading", src, sl->src_off);
    }
    if (!p->raw_dst) {
        return 0; /* the job's thread writes it */
    }
    return write_sparse(s, sl->buf, sl->len, sl->dst_off, &sl->written, &sl->err);
}

static void *par_worker(void *opaque)
{
    struct copy_worker *wk = opaque;
    struct copy_par *p = wk->p;
    struct copy_state *s = p->s;
    struct ct_err err = {0};
    int r = 0;
    for (unsigned i = 0; r == 0 && i < s->n; i++) {
        r = s->open_src(s->open_opaque, i, &wk->srcs[i], &err);
        if (r == 0 && ct_image_size(wk->srcs[i]) != ct_image_size(s->srcs[i])) {
            r = ct_err_set(&err, -EINVAL, "a copy thread's handle of '%s' differs in size",
                           ct_image_filename(s->srcs[i]));
        }
    }
    pthread_mutex_lock(&p->lock);
    p->starting--;
    if (r < 0 && !p->fatal) {
        p->fatal = r;
        p->fatal_err = err;
    }
    pthread_cond_broadcast(&p->done);
    for (;;) {
        struct copy_slot *sl = NULL;
        while (!p->stop && r == 0) {
            for (unsigned i = 0; i < p->nslots; i++) {
                struct copy_slot *c = &p->slots[i];
                if (c->state == SLOT_QUEUED && (!sl || c->seq < sl->seq)) {
                    sl = c;
                }
            }
            if (sl) {
                break;
            }
            p->idle++;
            pthread_cond_wait(&p->work, &p->lock);
            p->idle--;
        }
        if (p->stop || r < 0) {
            break;
        }
        sl->state = SLOT_RUNNING;
        pthread_mutex_unlock(&p->lock);
        int pr = par_process(p, sl, wk);
        pthread_mutex_lock(&p->lock);
        sl->r = pr;
        sl->state = SLOT_DONE;
        pthread_cond_broadcast(&p->done);
    }
    pthread_mutex_unlock(&p->lock);
    return NULL;
}

/* The job thread's side of one completed item: write it (qcow2 target), account it. */
static int par_finish(struct ct_job *job, struct copy_par *p, struct copy_slot *sl,
                      struct ct_err *err)
{
    struct copy_state *s = p->s;
    if (sl->r < 0) {
        *err = sl->err;
        return sl->r;
    }
    uint64_t written = sl->written;
    if (!p->raw_dst) {
        int r;
        if (sl->zero) {
            r = write_zeroes(s, sl->len, sl->dst_off);
            if (r < 0) {
                return job_io_error(err, r, "writing to", s->dst, sl->dst_off);
            }
        } else {
            r = write_sparse(s, sl->buf, sl->len, sl->dst_off, &written, err);
            if (r < 0) {
                return r;
            }
        }
    }
    job_progress_update(job, sl->len);
    return written ? job_ratelimit(job, written) : 0;
}

/* Cut the next item at (*src, *pos) into sl: 1, or 0 when every source is done, or < 0. */
static int par_next(struct copy_par *p, unsigned *src, uint64_t *pos, uint64_t *dst_base,
                    struct copy_slot *sl, struct ct_err *err)
{
    struct copy_state *s = p->s;
    while (*src < s->n && *pos >= ct_image_size(s->srcs[*src])) {
        *dst_base += ct_image_size(s->srcs[*src]);
        (*src)++;
        *pos = 0;
    }
    if (*src >= s->n) {
        return 0;
    }
    struct ct_image *img = s->srcs[*src];
    uint64_t size = ct_image_size(img), off = *pos;
    struct ct_map_extent m;
    int r = ct_image_map(img, off, CT_MIN(size - off, JOB_STATUS_STEP), &m);
    if (r == 0 && m.len == 0) {
        r = -EIO;
    }
    if (r < 0) {
        return job_io_error(err, r, "reading the allocation of", img, off);
    }
    uint64_t len = m.len;
    bool zero = (m.flags & CT_STATUS_ZERO) != 0;
    if (zero) {
        len = CT_MIN(len, (uint64_t)ZERO_STEP);
    } else {
        len = CT_MIN(len, p->bufsz);
        while (len < p->bufsz && off + len < size) {
            struct ct_map_extent m2;
            if (ct_image_map(img, off + len, p->bufsz - len, &m2) < 0 || m2.len == 0 ||
                (m2.flags & CT_STATUS_ZERO)) {
                break;
            }
            len += CT_MIN(m2.len, p->bufsz - len);
        }
    }
    sl->src = *src;
    sl->src_off = off;
    sl->dst_off = *dst_base + off;
    sl->len = len;
    sl->zero = zero;
    sl->written = 0;
    sl->r = 0;
    *pos = off + len;
    return 1;
}

static int copy_parallel(struct ct_job *job, struct copy_state *s, struct ct_err *err)
{
    struct copy_par p = {.s = s, .bufsz = job_buf_bytes(job)};
    p.raw_dst = strcmp(ct_image_format(s->dst), "raw") == 0;
    /* A slot per worker (reading, or writing to a raw target), two more being cut or
     * written by the job's thread; more would only hold memory. Readers for a qcow2 target
     * compete with its writer for CPU (reads from the page cache, decompression), so there
     * are at most as many as there are other CPUs: on 2 CPUs one reader overlaps the writer,
     * and a deep chain is opened once more, not nb_workers times. Workers for a raw target
     * write one at a time (dst_lock), so there are at most as many as CPUs: one writes while
     * the others read. */
    unsigned max_workers = s->nb_workers;
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    unsigned cap =
        p.raw_dst ? (ncpu > 2 ? (unsigned)ncpu : 2u) : (ncpu > 2 ? (unsigned)ncpu - 1 : 1u);
    max_workers = CT_MIN(max_workers, s->max_readers ? s->max_readers : cap);
    p.nslots = max_workers + 2;
    p.slots = calloc(p.nslots, sizeof(*p.slots));
    struct copy_worker *wk = calloc(s->nb_workers, sizeof(*wk));
    struct ct_image **handles = calloc((size_t)s->nb_workers * s->n, sizeof(*handles));
    if (!p.slots || !wk || !handles) {
        free(p.slots);
        free(wk);
        free(handles);
        return ct_err_set(err, -ENOMEM, "out of memory");
    }
    pthread_mutex_init(&p.lock, NULL);
    pthread_cond_init(&p.work, NULL);
    pthread_cond_init(&p.done, NULL);
    pthread_mutex_t dst_mu = PTHREAD_MUTEX_INITIALIZER;
    s->dst_lock = p.raw_dst ? &dst_mu : NULL;
    unsigned started = 0;
    int ret = 0;
    unsigned src = 0;
    uint64_t pos = 0, dst_base = 0, next_seq = 0, write_seq = 0;
    bool produced_all = false;
    unsigned inflight = 0;
    while (ret == 0) {
        ret = job_pause_point(job);
        if (ret < 0) {
            break;
        }
        /* A completed item the job's thread may take now. */
        struct copy_slot *ready = NULL, *free_slot = NULL;
        pthread_mutex_lock(&p.lock);
        for (;;) {
            ready = free_slot = NULL;
            for (unsigned i = 0; i < p.nslots; i++) {
                struct copy_slot *c = &p.slots[i];
                if (c->state == SLOT_DONE) {
                    if (c->r < 0) {
                        ready = c; /* errors first */
                        break;
                    }
                    bool ok = p.raw_dst || s->out_of_order || c->seq == write_seq;
                    if (ok && (!ready || c->seq < ready->seq)) {
                        ready = c;
                    }
                } else if (c->state == SLOT_FREE && !free_slot) {
                    free_slot = c;
                }
            }
            if (p.fatal || ready || (free_slot && !produced_all) || inflight == 0) {
                break;
            }
            /* About to wait: start one more worker if reading is what we wait for. */
            unsigned queued = 0;
            for (unsigned i = 0; i < p.nslots; i++) {
                queued += p.slots[i].state == SLOT_QUEUED;
            }
            if (queued && !p.idle && !p.starting && started < max_workers) {
                struct copy_worker *w = &wk[started];
                w->p = &p;
                w->srcs = handles + (size_t)started * s->n;
                int e = pthread_create(&w->tid, NULL, par_worker, w);
                if (e == 0) {
                    started++;
                    p.starting++;
                    continue;
                }
                if (!started) {
                    p.fatal = ct_err_set(&p.fatal_err, -e, "cannot start a copy thread: %s",
                                         ct_strerror(-e));
                    break;
                }
            }
            pthread_cond_wait(&p.done, &p.lock);
        }
        int fatal = p.fatal;
        pthread_mutex_unlock(&p.lock);
        if (fatal) {
            *err = p.fatal_err;
            ret = fatal;
            break;
        }
        if (ready) {
            ret = par_finish(job, &p, ready, err);
            if (ready->seq == write_seq) {
                write_seq++; /* in-order writing (qcow2 target without -W) */
            }
            pthread_mutex_lock(&p.lock);
            ready->state = SLOT_FREE;
            inflight--;
            pthread_mutex_unlock(&p.lock);
            continue;
        }
        if (free_slot && !produced_all) {
            int r = par_next(&p, &src, &pos, &dst_base, free_slot, err);
            if (r < 0) {
                ret = r;
                break;
            }
            if (r == 0) {
                produced_all = true;
                continue;
            }
            free_slot->seq = next_seq++;
            inflight++;
            bool needs_worker = !free_slot->zero || (p.raw_dst && !s->dst_is_zero);
            pthread_mutex_lock(&p.lock);
            free_slot->state = needs_worker ? SLOT_QUEUED : SLOT_DONE;
            if (needs_worker) {
                pthread_cond_signal(&p.work);
            }
            pthread_mutex_unlock(&p.lock);
            continue;
        }
        if (produced_all && inflight == 0) {
            break;
        }
    }
    pthread_mutex_lock(&p.lock);
    p.stop = true;
    pthread_cond_broadcast(&p.work);
    pthread_mutex_unlock(&p.lock);
    for (unsigned i = 0; i < started; i++) {
        pthread_join(wk[i].tid, NULL);
    }
    for (size_t i = 0; i < (size_t)started * s->n; i++) {
        ct_image_close(handles[i], NULL);
    }
    free(handles);
    for (unsigned i = 0; i < p.nslots; i++) {
        free(p.slots[i].buf);
    }
    pthread_cond_destroy(&p.done);
    pthread_cond_destroy(&p.work);
    pthread_mutex_destroy(&p.lock);
    s->dst_lock = NULL;
    free(p.slots);
    free(wk);
    return ret;
}

static int copy_run(struct ct_job *job, struct ct_err *err)
{
    struct copy_state *s = job_opaque(job);
    uint64_t total = 0;
    for (unsigned i = 0; i < s->n; i++) {
        total += ct_image_size(s->srcs[i]);
    }
    job_progress_set_total(job, total);
    job_write_behind(job, s->dst);
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
            .compress = s->compress,
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
    if (s->nb_workers >= 2 && !s->compress) {
        int r = copy_parallel(job, s, err);
        if (r == 0) {
            r = ct_image_flush(s->dst);
            if (r < 0) {
                r = job_io_error(err, r, "flushing", s->dst, 0);
            }
        }
        return r;
    }
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
    s->out_of_order = o->out_of_order;
    s->copy_offload = o->copy_offload;
    if (o->nb_workers >= 2 && o->open_src) {
        s->nb_workers = o->nb_workers;
        s->open_src = o->open_src;
        s->open_opaque = o->open_opaque;
        s->max_readers = o->max_readers;
    }
    return job_create(out, &copy_driver, s, jo, err);
}
