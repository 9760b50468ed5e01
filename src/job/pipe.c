/*
 * The chain jobs' write pipeline (pipe.h): a FIFO of writes served by one writer thread.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "job/chain.h"
#include "job/job-int.h"
#include "job/pipe.h"

static unsigned buf_index(const struct job_pipe *p, const uint8_t *buf)
{
    for (unsigned i = 0; i < p->nbufs; i++) {
        if (p->bufs[i] == buf) {
            return i;
        }
    }
    abort(); /* not one of ours: a caller bug */
}

static int run_item(struct job_pipe *p, const struct job_pipe_item *it, struct ct_err *err)
{
    return it->zero ? p->ops->zero(p->ctx, it->len, it->off, err)
                    : p->ops->data(p->ctx, it->buf, it->len, it->off, err);
}

/* With lock held: the first failure wins. */
static void note_failure(struct job_pipe *p, int r, const struct ct_err *err)
{
    if (r < 0 && p->r == 0) {
        p->r = r;
        p->err = *err;
        if (p->err.code == 0) {
            ct_err_set(&p->err, r, "%s", ct_strerror(r));
        }
    }
}

/* With lock held: until nothing is queued or being written. */
static void wait_idle_locked(struct job_pipe *p)
{
    while (p->qlen > 0 || p->busy) {
        pthread_cond_wait(&p->cond, &p->lock);
    }
}

static void *writer(void *opaque)
{
    struct job_pipe *p = opaque;
    pthread_mutex_lock(&p->lock);
    for (;;) {
        while (p->qlen == 0 && !p->stop) {
            pthread_cond_wait(&p->cond, &p->lock);
        }
        if (p->qlen == 0) {
            break; /* stop, and nothing left */
        }
        struct job_pipe_item it = p->q[p->qhead];
        bool skip = p->r < 0; /* after a failure, nothing more is written */
        p->busy = true;
        pthread_mutex_unlock(&p->lock);

        struct ct_err err = {0};
        int r = skip ? 0 : run_item(p, &it, &err);

        pthread_mutex_lock(&p->lock);
        note_failure(p, r, &err);
        p->qhead = (p->qhead + 1) % (JOB_PIPE_DEPTH * 2);
        p->qlen--;
        p->busy = false;
        if (it.buf) {
            p->free_mask |= 1u << buf_index(p, it.buf);
        }
        pthread_cond_broadcast(&p->cond);
    }
    pthread_mutex_unlock(&p->lock);
    return NULL;
}

int job_pipe_init(struct job_pipe *p, struct ct_job *job, struct ct_image *target,
                  const struct job_pipe_ops *ops, void *ctx, uint64_t bufsz, struct ct_err *err)
{
    memset(p, 0, sizeof(*p));
    p->align = ct_image_cluster_size(target); /* 0 for raw: no backing, no copy-on-write */
    p->ops = ops;
    p->ctx = ctx;
    p->bufsz = bufsz;
    p->threaded = !job_has_io_lock(job);
    p->nbufs = p->threaded ? JOB_PIPE_DEPTH + 1 : 1;
    for (unsigned i = 0; i < p->nbufs; i++) {
        if (!(p->bufs[i] = job_buf_alloc(bufsz))) {
            job_pipe_fini(p);
            return ct_err_set(err, -ENOMEM, "out of memory");
        }
        p->free_mask |= 1u << i;
    }
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->cond, NULL);
    if (p->threaded) {
        int e = pthread_create(&p->tid, NULL, writer, p);
        if (e != 0) {
            /* No thread: write inline, as under an I/O lock. */
            p->threaded = false;
        }
    }
    return 0;
}

uint8_t *job_pipe_buf(struct job_pipe *p)
{
    pthread_mutex_lock(&p->lock);
    while (p->free_mask == 0 && p->r == 0) {
        pthread_cond_wait(&p->cond, &p->lock);
    }
    uint8_t *buf = NULL;
    if (p->r == 0) {
        unsigned i = (unsigned)__builtin_ctz(p->free_mask);
        p->free_mask &= ~(1u << i);
        buf = p->bufs[i];
    }
    pthread_mutex_unlock(&p->lock);
    return buf;
}

void job_pipe_unbuf(struct job_pipe *p, uint8_t *buf)
{
    pthread_mutex_lock(&p->lock);
    p->free_mask |= 1u << buf_index(p, buf);
    pthread_cond_broadcast(&p->cond);
    pthread_mutex_unlock(&p->lock);
}

static int put(struct job_pipe *p, const struct job_pipe_item *it)
{
    bool whole = !p->align || (it->off % p->align == 0 && it->len % p->align == 0);
    if (p->threaded && !whole) {
        /* Copy-on-write may read the chain the caller reads: run it here, writer idle. */
        pthread_mutex_lock(&p->lock);
        wait_idle_locked(p);
        pthread_mutex_unlock(&p->lock);
    }
    if (!p->threaded || !whole) {
        pthread_mutex_lock(&p->lock);
        int r = p->r;
        pthread_mutex_unlock(&p->lock);
        struct ct_err err = {0};
        if (r == 0) {
            r = run_item(p, it, &err);
        }
        pthread_mutex_lock(&p->lock);
        note_failure(p, r, &err);
        if (it->buf) {
            p->free_mask |= 1u << buf_index(p, it->buf);
        }
        r = p->r;
        pthread_mutex_unlock(&p->lock);
        return r;
    }
    pthread_mutex_lock(&p->lock);
    while (p->qlen == JOB_PIPE_DEPTH * 2 && p->r == 0) {
        pthread_cond_wait(&p->cond, &p->lock);
    }
    int r = p->r;
    if (r == 0) {
        p->q[(p->qhead + p->qlen) % (JOB_PIPE_DEPTH * 2)] = *it;
        p->qlen++;
        pthread_cond_broadcast(&p->cond);
    } else if (it->buf) {
        p->free_mask |= 1u << buf_index(p, it->buf);
    }
    pthread_mutex_unlock(&p->lock);
    return r;
}

int job_pipe_put_data(struct job_pipe *p, uint8_t *buf, uint64_t len, uint64_t off)
{
    struct job_pipe_item it = {.zero = false, .off = off, .len = len, .buf = buf};
    return put(p, &it);
}

int job_pipe_put_zero(struct job_pipe *p, uint64_t len, uint64_t off)
{
    struct job_pipe_item it = {.zero = true, .off = off, .len = len};
    return put(p, &it);
}

int job_pipe_drain(struct job_pipe *p, struct ct_err *err)
{
    pthread_mutex_lock(&p->lock);
    wait_idle_locked(p);
    int r = p->r;
    if (r < 0 && err) {
        *err = p->err;
    }
    pthread_mutex_unlock(&p->lock);
    return r;
}

int job_pipe_finish(struct job_pipe *p, int r, struct ct_err *err)
{
    struct ct_err werr = {0};
    int wr = job_pipe_drain(p, &werr);
    job_pipe_fini(p);
    if (wr < 0) {
        *err = werr;
        return wr;
    }
    return r;
}

void job_pipe_fini(struct job_pipe *p)
{
    if (p->nbufs && p->bufs[p->nbufs - 1]) {
        /* init completed: the lock exists (and the writer, when threaded). */
        if (p->threaded) {
            pthread_mutex_lock(&p->lock);
            p->stop = true;
            pthread_cond_broadcast(&p->cond);
            pthread_mutex_unlock(&p->lock);
            pthread_join(p->tid, NULL);
        }
        pthread_mutex_destroy(&p->lock);
        pthread_cond_destroy(&p->cond);
    }
    for (unsigned i = 0; i < p->nbufs; i++) {
        free(p->bufs[i]);
    }
    memset(p, 0, sizeof(*p));
}
