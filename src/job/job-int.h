/*
 * What job implementations see of the job framework (QEMU's job_int.h role). Private to
 * src/job/ and its tests.
 */
#ifndef CT_JOB_INT_H
#define CT_JOB_INT_H

#include "job/job.h"

/*
 * A job type. Callback order (job.c enforces it):
 *   success: run -> prepare -> commit -> clean
 *   failure, cancel, or prepare failing: [run] -> abort -> clean
 * run does the work and calls job_pause_point() between requests; prepare makes the changes
 * that may still fail (links, emptying); commit and abort cannot fail; clean always runs last.
 * Only run and (if present) complete are called without the job being in a final phase; none
 * of them is called with the job's lock held.
 */
struct job_driver {
    const char *type;
    int (*run)(struct ct_job *job, struct ct_err *err);
    int (*prepare)(struct ct_job *job, struct ct_err *err);
    void (*commit)(struct ct_job *job);
    void (*abort)(struct ct_job *job);
    void (*clean)(struct ct_job *job);
    /* The user called ct_job_complete() on a READY job (optional; run sees it anyway). */
    void (*complete)(struct ct_job *job);
    /* Free the driver's state (job_opaque). Called once from ct_job_free. */
    void (*free)(struct ct_job *job);
};

/* Make a job of type drv with driver state opaque (owned by the job from now on: drv->free
 * runs even when this fails). */
int job_create(struct ct_job **out, const struct job_driver *drv, void *opaque,
               const struct ct_job_opts *opts, struct ct_err *err);
void *job_opaque(struct ct_job *job);
/* Request size for copies (from ct_job_opts.buf_bytes). */
uint64_t job_buf_bytes(const struct ct_job *job);

/* The job writes much of its data into img: start writing it back to disk as it goes (every
 * JOB_WRITE_BEHIND bytes, ct_file_set_write_behind) so that the flush that ends the job does not
 * wait for all of it, until the job ends. One image per job. */
#define JOB_WRITE_BEHIND (32ull << 20)
void job_write_behind(struct ct_job *job, struct ct_image *img);

/* Between requests: blocks while paused (status PAUSED or STANDBY meanwhile). Returns 0, or
 * -ECANCELED when the job was cancelled (the run callback must then return promptly). */
int job_pause_point(struct ct_job *job);
bool job_is_cancelled(struct ct_job *job);
/* Was the job given an I/O lock (ct_job_opts.io_lock: it shares its images with others)? */
bool job_has_io_lock(const struct ct_job *job);
/* Account bytes moved for the rate limit and sleep as needed (interrupted by cancel, pause
 * and speed changes). Returns 0 or -ECANCELED. */
int job_ratelimit(struct ct_job *job, uint64_t bytes);

void job_progress_set_total(struct ct_job *job, uint64_t total);
void job_progress_add_total(struct ct_job *job, uint64_t bytes);
/* Move progress forward and call the user's progress callback. */
void job_progress_update(struct ct_job *job, uint64_t bytes);

/* For jobs that converge and then wait (mirror, active commit): enter READY and wait for
 * ct_job_complete (returns 0), a soft cancel (ct_job_cancel with force=false while READY:
 * returns 1, finish without the switch-over, as QEMU's mirror) or a hard cancel (-ECANCELED).
 * Pause requests while waiting move to STANDBY and back. */
int job_ready_wait(struct ct_job *job);
/* The same, but also returns 2 after timeout_ns (0 = no timeout) or once job_kick() is called,
 * so that a READY job can go on copying (mirror) and wait again. */
int job_ready_wait_timeout(struct ct_job *job, uint64_t timeout_ns);
/* Wake a job waiting in job_ready_wait_timeout. Takes job->lock:
 * callers may hold the io lock, not job->lock. */
void job_kick(struct ct_job *job);

/* Rate limiting arithmetic (pure, for tests): a 100 ms slice with a quota of speed/10 bytes.
 * Returns the delay in ns to wait after dispatching bytes at now_ns. */
struct job_ratelimit {
    uint64_t slice_start_ns, slice_end_ns, dispatched;
};
uint64_t job_ratelimit_delay(struct job_ratelimit *rl, uint64_t speed, uint64_t now_ns,
                             uint64_t bytes);

#endif
