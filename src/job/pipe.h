/*
 * The write pipeline of the chain jobs (commit, stream/pull): the job's thread walks the
 * allocation and reads, a writer thread writes, so reading request N+1 overlaps writing
 * request N, with up to JOB_PIPE_DEPTH requests in flight.
 *
 * A struct ct_image is not thread-safe, so the rule is ownership: while the pipeline runs, the
 * writer thread is the only one that touches the target image (the ops below run there and
 * may use only the target and their own context); the job's thread touches only the images
 * it reads. job_pipe_drain() hands the target back to the caller until the next put.
 *
 * A write that does not cover whole clusters of a qcow2 target makes the engine read the
 * rest of the cluster through the target's backing chain (copy-on-write), and that chain may
 * be what the job's thread is reading (stream). Such writes run in the job's thread after
 * the writer has drained (`align`): whole-cluster copies, the common case, stay in flight.
 *
 * When the job runs under an I/O lock (cowtreed: guest requests share the images and wait
 * for the lock), the ops run inline in the job's thread instead: the lock is released at
 * every pause point, and a writer still busy then would race the guest. Offline jobs get the
 * thread.
 *
 * Invariant W1: writes reach the target in the order they were put (one writer, FIFO), so
 * a run with the pipeline writes exactly what the same run wrote without it, in the same
 * order (fault injection's K-th write is the same write).
 */
#ifndef CT_JOB_PIPE_H
#define CT_JOB_PIPE_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "util/err.h"

struct ct_job;

#define JOB_PIPE_DEPTH 4

struct job_pipe_ops {
    /* Write [off, off+len) of the target from buf. */
    int (*data)(void *ctx, const uint8_t *buf, uint64_t len, uint64_t off, struct ct_err *err);
    /* Make [off, off+len) of the target read as zeros (however the job wants that done). */
    int (*zero)(void *ctx, uint64_t len, uint64_t off, struct ct_err *err);
};

struct job_pipe_item {
    bool zero;
    uint64_t off, len;
    uint8_t *buf;
};

struct job_pipe {
    const struct job_pipe_ops *ops;
    void *ctx;
    bool threaded;
    uint64_t align; /* items not aligned to this (0: any) run inline, after a drain */
    uint64_t bufsz;
    uint8_t *bufs[JOB_PIPE_DEPTH + 1];
    unsigned nbufs, free_mask; /* bit i: bufs[i] is free */

    pthread_t tid;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    struct job_pipe_item q[JOB_PIPE_DEPTH * 2];
    unsigned qhead, qlen;
    bool busy; /* the writer is running an item */
    bool stop;
    int r; /* first failure (the pipeline stops writing after it) */
    struct ct_err err;
};

/* Start the pipeline for writes into target, with buffers of bufsz bytes. Returns 0 or
 * -ENOMEM in err. */
int job_pipe_init(struct job_pipe *p, struct ct_job *job, struct ct_image *target,
                  const struct job_pipe_ops *ops, void *ctx, uint64_t bufsz, struct ct_err *err);
/* A free buffer to read into (waits for one). NULL once the pipeline failed. */
uint8_t *job_pipe_buf(struct job_pipe *p);
/* Give back a buffer taken with job_pipe_buf without writing it. */
void job_pipe_unbuf(struct job_pipe *p, uint8_t *buf);
/* Queue a write of buf (from job_pipe_buf; the pipeline owns it from now on). Returns 0, or
 * the first failure so far (as a negative errno; job_pipe_drain gives its message). */
int job_pipe_put_data(struct job_pipe *p, uint8_t *buf, uint64_t len, uint64_t off);
int job_pipe_put_zero(struct job_pipe *p, uint64_t len, uint64_t off);
/* Wait until everything queued is written. Returns 0 or the first failure, with its message
 * in err. The target is the caller's again until the next put. */
int job_pipe_drain(struct job_pipe *p, struct ct_err *err);
/* Drain (failures ignored), stop the writer and free the buffers. Safe after a failed init. */
void job_pipe_fini(struct job_pipe *p);
/* End of a job's copy that returned r (its message in err): drain and fini. A write failure is
 * the one reported (its message replaces err's); else r. */
int job_pipe_finish(struct job_pipe *p, int r, struct ct_err *err);

#endif
