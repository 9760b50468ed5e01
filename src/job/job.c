/*
 * The job framework: lifecycle state machine, verbs, pause points, progress and rate limit.
 * It knows nothing about images; the jobs in commit.c, stream.c, rebase.c and copy.c are
 * drivers (job-int.h) built on it.
 *
 * State diagram (QEMU's JobStatus semantics; "x" = cancel or failure):
 *
 *                        pause                           pause
 *                   .-------------> PAUSED          .-------------> STANDBY
 *                   |                 |             |                  |
 *                   |  .---resume-----'             |  .---resume------'
 *                   |  v                            |  v
 *   CREATED ----> RUNNING ----(converged)-------> READY   (waits for complete)
 *      |             |                              |
 *      |             | run done                     | complete, or soft cancel
 *      |             v                              |
 *      |          WAITING <-------------------------'   (transaction members wait)
 *      |             |
 *      |             v
 *      |          PENDING --(finalize: prepare ok, commit, clean)--> CONCLUDED --dismiss--> NULL
 *      |             |                                                  ^
 *      x             x  (or prepare failed)                             |
 *      |             v                                                  |
 *      '-------> ABORTING ----------------(abort, clean)----------------'
 *   (RUNNING, READY and WAITING also go to ABORTING on x; a cancelled PAUSED job resumes
 *   first, to leave through its pause point)
 *
 * Invariants:
 *  J1. Every status change goes through set_status(), which asserts the transition table.
 *  J2. Callbacks (run, prepare, commit, abort, clean, progress) are never called with job->lock
 *      held; on_status is, and must not call back.
 *  J3. Exactly one of commit/abort runs, then clean, exactly once per job that leaves CREATED.
 *  J4. A paused job only stops at a pause point; pause/cancel take effect between requests.
 */
#include <assert.h>
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "job/job-int.h"
#include "util/err.h"
#include "util/misc.h"

#define DEFAULT_BUF_BYTES (2u << 20)
#define SLICE_NS          100000000ull /* rate limit accounting slice: 100 ms */

struct ct_job {
    const struct job_driver *drv;
    void *opaque;
    char *id;
    uint64_t buf_bytes;
    struct ct_image *write_behind; /* job_write_behind(), or NULL */
    ct_job_progress_fn progress_cb;
    ct_job_status_fn status_cb;
    void *cb_opaque;
    void (*io_lock)(void *opaque);
    void (*io_unlock)(void *opaque);
    bool io_held; /* the job's thread holds the io lock (only that thread touches this) */
    bool auto_finalize, auto_dismiss;

    pthread_mutex_t lock;
    pthread_cond_t cond; /* signalled on every state or request change */
    /* Protected by lock: */
    enum ct_job_status status;
    unsigned pause_count; /* outstanding ct_job_pause calls */
    bool cancelled;       /* hard cancel requested */
    bool soft_cancelled;  /* cancel(force=false) while READY */
    bool complete_req;    /* ct_job_complete called */
    unsigned kick;        /* bumped by speed changes, to wake rate-limit sleeps */
    unsigned wake;        /* bumped by job_kick, to wake a READY wait */
    uint64_t speed;
    struct job_ratelimit rl;
    uint64_t done, total;
    int ret;
    struct ct_err err;
    bool finished_phase; /* prepare/commit/abort/clean done (J3) */
    bool final_claimed;  /* someone is running the final phase (J3): the others keep out */
};

/*
 * Transition table: allowed[from][to]. Columns in enum order:
 *                C  R  P  Y  S  W  D  X  E  N       (X = ABORTING, E = CONCLUDED, D = PENDING)
 */
static const bool allowed[CT_JOB_STATUS__MAX][CT_JOB_STATUS__MAX] = {
    [CT_JOB_STATUS_CREATED] = {0, 1, 0, 0, 0, 0, 0, 1, 0, 0},
    [CT_JOB_STATUS_RUNNING] = {0, 0, 1, 1, 0, 1, 0, 1, 0, 0},
    [CT_JOB_STATUS_PAUSED] = {0, 1, 0, 0, 0, 0, 0, 0, 0, 0},
    [CT_JOB_STATUS_READY] = {0, 0, 0, 0, 1, 1, 0, 1, 0, 0},
    [CT_JOB_STATUS_STANDBY] = {0, 0, 0, 1, 0, 0, 0, 0, 0, 0},
    [CT_JOB_STATUS_WAITING] = {0, 0, 0, 0, 0, 0, 1, 1, 0, 0},
    [CT_JOB_STATUS_PENDING] = {0, 0, 0, 0, 0, 0, 0, 1, 1, 0},
    [CT_JOB_STATUS_ABORTING] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 0},
    [CT_JOB_STATUS_CONCLUDED] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 1},
    [CT_JOB_STATUS_NULL] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0},
};

/* Verb table: accepted[verb][status], same columns. */
static const bool accepted[CT_JOB_VERB__MAX][CT_JOB_STATUS__MAX] = {
    [CT_JOB_VERB_CANCEL] = {1, 1, 1, 1, 1, 1, 1, 0, 0, 0},
    [CT_JOB_VERB_PAUSE] = {1, 1, 1, 1, 1, 0, 0, 0, 0, 0},
    [CT_JOB_VERB_RESUME] = {1, 1, 1, 1, 1, 0, 0, 0, 0, 0},
    [CT_JOB_VERB_SET_SPEED] = {1, 1, 1, 1, 1, 0, 0, 0, 0, 0},
    [CT_JOB_VERB_COMPLETE] = {0, 0, 0, 1, 0, 0, 0, 0, 0, 0},
    [CT_JOB_VERB_FINALIZE] = {0, 0, 0, 0, 0, 0, 1, 0, 0, 0},
    [CT_JOB_VERB_DISMISS] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 0},
};

static const char *const status_names[CT_JOB_STATUS__MAX] = {
    "created", "running", "paused",   "ready",     "standby",
    "waiting", "pending", "aborting", "concluded", "null",
};

static const char *const verb_names[CT_JOB_VERB__MAX] = {
    "cancel", "pause", "resume", "set-speed", "complete", "finalize", "dismiss",
};

const char *ct_job_status_name(enum ct_job_status status)
{
    return (unsigned)status < CT_JOB_STATUS__MAX ? status_names[status] : "invalid";
}

const char *ct_job_verb_name(enum ct_job_verb verb)
{
    return (unsigned)verb < CT_JOB_VERB__MAX ? verb_names[verb] : "invalid";
}

bool ct_job_transition_allowed(enum ct_job_status from, enum ct_job_status to)
{
    if ((unsigned)from >= CT_JOB_STATUS__MAX || (unsigned)to >= CT_JOB_STATUS__MAX) {
        return false;
    }
    return allowed[from][to];
}

bool ct_job_verb_allowed(enum ct_job_verb verb, enum ct_job_status status)
{
    if ((unsigned)verb >= CT_JOB_VERB__MAX || (unsigned)status >= CT_JOB_STATUS__MAX) {
        return false;
    }
    return accepted[verb][status];
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* J1. Called with lock held. */
static void set_status(struct ct_job *job, enum ct_job_status to)
{
    assert(allowed[job->status][to]);
    job->status = to;
    if (job->status_cb) {
        job->status_cb(job, to, job->cb_opaque);
    }
    pthread_cond_broadcast(&job->cond);
}

static int verb_check(struct ct_job *job, enum ct_job_verb verb, struct ct_err *err)
{
    if (!accepted[verb][job->status]) {
        return ct_err_set(err, -CT_E_STATE,
                          "Job '%s' in state '%s' cannot accept command verb '%s'", job->id,
                          status_names[job->status], verb_names[verb]);
    }
    return 0;
}

int job_create(struct ct_job **out, const struct job_driver *drv, void *opaque,
               const struct ct_job_opts *opts, struct ct_err *err)
{
    static const struct ct_job_opts defaults;
    *out = NULL;
    if (!opts) {
        opts = &defaults;
    }
    struct ct_job *job = calloc(1, sizeof(*job));
    if (!job) {
        goto nomem;
    }
    job->id = strdup(opts->id ? opts->id : drv->type);
    if (!job->id) {
        free(job);
        goto nomem;
    }
    job->drv = drv;
    job->opaque = opaque;
    uint64_t b = opts->buf_bytes ? opts->buf_bytes : DEFAULT_BUF_BYTES;
    b = ct_align_up(CT_MAX(b, 65536u), 65536u);
    job->buf_bytes = CT_MIN(b, 64ull << 20);
    job->progress_cb = opts->progress;
    job->status_cb = opts->on_status;
    job->cb_opaque = opts->opaque;
    if (opts->io_lock && opts->io_unlock) {
        job->io_lock = opts->io_lock;
        job->io_unlock = opts->io_unlock;
    }
    job->auto_finalize = !opts->manual_finalize;
    job->auto_dismiss = !opts->manual_dismiss;
    job->speed = opts->speed;
    job->status = CT_JOB_STATUS_CREATED;
    pthread_mutex_init(&job->lock, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&job->cond, &ca);
    pthread_condattr_destroy(&ca);
    *out = job;
    return 0;
nomem:
    if (drv->free) {
        struct ct_job tmp = {.opaque = opaque};
        drv->free(&tmp);
    }
    return ct_err_set(err, -ENOMEM, "out of memory");
}

void *job_opaque(struct ct_job *job)
{
    return job->opaque;
}

uint64_t job_buf_bytes(const struct ct_job *job)
{
    return job->buf_bytes;
}

void ct_job_free(struct ct_job *job)
{
    if (!job) {
        return;
    }
    assert(job->status == CT_JOB_STATUS_CREATED || job->status == CT_JOB_STATUS_CONCLUDED ||
           job->status == CT_JOB_STATUS_NULL);
    if (job->drv->free) {
        job->drv->free(job);
    }
    pthread_cond_destroy(&job->cond);
    pthread_mutex_destroy(&job->lock);
    free(job->id);
    free(job);
}

/* The caller's I/O lock (ct_job_opts.io_lock): held by the job while it works. */
static void io_lock(struct ct_job *job)
{
    if (job->io_lock) {
        job->io_lock(job->cb_opaque);
        job->io_held = true;
    }
}

static void io_unlock(struct ct_job *job)
{
    if (job->io_unlock) {
        job->io_held = false;
        job->io_unlock(job->cb_opaque);
    }
}

/* ---- the final phase (J3): called without the lock ---- */

static void conclude(struct ct_job *job)
{
    pthread_mutex_lock(&job->lock);
    set_status(job, CT_JOB_STATUS_CONCLUDED);
    if (job->auto_dismiss) {
        set_status(job, CT_JOB_STATUS_NULL);
    }
    pthread_mutex_unlock(&job->lock);
}

void job_write_behind(struct ct_job *job, struct ct_image *img)
{
    job->write_behind = img;
    ct_image_set_write_behind(img, JOB_WRITE_BEHIND);
}

/* Before clean: the images may be closed as soon as the job concludes. */
static void end_write_behind(struct ct_job *job)
{
    if (job->write_behind) {
        ct_image_set_write_behind(job->write_behind, 0);
        job->write_behind = NULL;
    }
}

/* Status is ABORTING; ret is the reason. */
static void abort_phase(struct ct_job *job)
{
    assert(!job->finished_phase);
    job->finished_phase = true;
    if (job->drv->abort) {
        job->drv->abort(job);
    }
    end_write_behind(job);
    if (job->drv->clean) {
        job->drv->clean(job);
    }
    conclude(job);
}

/* Status is PENDING. */
static void finalize_phase(struct ct_job *job)
{
    struct ct_err perr = {0};
    int r = job->drv->prepare ? job->drv->prepare(job, &perr) : 0;
    if (r < 0) {
        pthread_mutex_lock(&job->lock);
        job->ret = r;
        job->err = perr;
        set_status(job, CT_JOB_STATUS_ABORTING);
        pthread_mutex_unlock(&job->lock);
        abort_phase(job);
        return;
    }
    assert(!job->finished_phase);
    job->finished_phase = true;
    if (job->drv->commit) {
        job->drv->commit(job);
    }
    end_write_behind(job);
    if (job->drv->clean) {
        job->drv->clean(job);
    }
    conclude(job);
}

static int result_locked(struct ct_job *job, struct ct_err *err)
{
    if (job->ret < 0 && err) {
        *err = job->err;
        if (!err->msg[0]) {
            ct_err_set(err, job->ret, "%s", ct_strerror(job->ret));
        }
    }
    return job->ret;
}

int ct_job_run(struct ct_job *job, struct ct_err *err)
{
    pthread_mutex_lock(&job->lock);
    if (job->status != CT_JOB_STATUS_CREATED) {
        int r = ct_err_set(err, -CT_E_STATE, "Job '%s' has already been started", job->id);
        pthread_mutex_unlock(&job->lock);
        return r;
    }
    if (job->cancelled) {
        /* Cancelled before it started: nothing ran, nothing to undo but the clean-up. */
        job->ret = -ECANCELED;
        set_status(job, CT_JOB_STATUS_ABORTING);
        pthread_mutex_unlock(&job->lock);
        abort_phase(job);
        return ct_job_result(job, err);
    }
    set_status(job, CT_JOB_STATUS_RUNNING);
    pthread_mutex_unlock(&job->lock);

    struct ct_err rerr = {0};
    io_lock(job);
    int r = job->drv->run(job, &rerr);

    pthread_mutex_lock(&job->lock);
    if (r == 0 && job->cancelled) {
        r = -ECANCELED;
    }
    job->ret = r;
    if (r < 0) {
        job->err = rerr;
        set_status(job, CT_JOB_STATUS_ABORTING);
        pthread_mutex_unlock(&job->lock);
        abort_phase(job);
        io_unlock(job);
        return ct_job_result(job, err);
    }
    set_status(job, CT_JOB_STATUS_WAITING);
    /* No transactions yet: nobody to wait for. */
    set_status(job, CT_JOB_STATUS_PENDING);
    bool fin = job->auto_finalize;
    job->final_claimed = fin; /* (before the lock drops: a cancel or finalize now is too late) */
    pthread_mutex_unlock(&job->lock);
    if (fin) {
        finalize_phase(job);
    }
    io_unlock(job);
    return ct_job_result(job, err);
}

int ct_job_finalize(struct ct_job *job, struct ct_err *err)
{
    pthread_mutex_lock(&job->lock);
    int r = verb_check(job, CT_JOB_VERB_FINALIZE, err);
    if (r == 0 && job->final_claimed) {
        r = ct_err_set(err, -CT_E_STATE, "Job '%s' is already being finalized", job->id);
    }
    if (r == 0) {
        job->final_claimed = true;
    }
    pthread_mutex_unlock(&job->lock);
    if (r < 0) {
        return r;
    }
    io_lock(job);
    finalize_phase(job);
    io_unlock(job);
    return ct_job_result(job, err);
}

int ct_job_cancel(struct ct_job *job, bool force, struct ct_err *err)
{
    pthread_mutex_lock(&job->lock);
    int r = verb_check(job, CT_JOB_VERB_CANCEL, err);
    bool run_abort = false;
    if (r == 0 && job->final_claimed) {
        /* Finalizing already (auto-finalize, or a finalize from another thread): too late,
         * as in QEMU, where an auto-finalized job never rests in PENDING. */
        r = ct_err_set(err, -CT_E_STATE, "Job '%s' is being finalized and cannot be cancelled",
                       job->id);
    }
    if (r == 0) {
        if (!force &&
            (job->status == CT_JOB_STATUS_READY || job->status == CT_JOB_STATUS_STANDBY)) {
            job->soft_cancelled = true;
        } else {
            job->cancelled = true;
        }
        if (job->status == CT_JOB_STATUS_PENDING) {
            /* The job's thread is gone (manual finalize): undo here. */
            job->final_claimed = true;
            job->ret = -ECANCELED;
            set_status(job, CT_JOB_STATUS_ABORTING);
            run_abort = true;
        }
        pthread_cond_broadcast(&job->cond);
    }
    pthread_mutex_unlock(&job->lock);
    if (run_abort) {
        io_lock(job);
        abort_phase(job);
        io_unlock(job);
    }
    return r;
}

int ct_job_pause(struct ct_job *job, struct ct_err *err)
{
    pthread_mutex_lock(&job->lock);
    int r = verb_check(job, CT_JOB_VERB_PAUSE, err);
    if (r == 0) {
        job->pause_count++;
        pthread_cond_broadcast(&job->cond);
    }
    pthread_mutex_unlock(&job->lock);
    return r;
}

int ct_job_resume(struct ct_job *job, struct ct_err *err)
{
    pthread_mutex_lock(&job->lock);
    int r = verb_check(job, CT_JOB_VERB_RESUME, err);
    if (r == 0 && job->pause_count == 0) {
        r = ct_err_set(err, -CT_E_STATE, "Job '%s' is not paused", job->id);
    }
    if (r == 0) {
        job->pause_count--;
        pthread_cond_broadcast(&job->cond);
    }
    pthread_mutex_unlock(&job->lock);
    return r;
}

int ct_job_set_speed(struct ct_job *job, uint64_t bytes_per_sec, struct ct_err *err)
{
    pthread_mutex_lock(&job->lock);
    int r = verb_check(job, CT_JOB_VERB_SET_SPEED, err);
    if (r == 0) {
        job->speed = bytes_per_sec;
        job->kick++;
        pthread_cond_broadcast(&job->cond);
    }
    pthread_mutex_unlock(&job->lock);
    return r;
}

int ct_job_complete(struct ct_job *job, struct ct_err *err)
{
    pthread_mutex_lock(&job->lock);
    int r = verb_check(job, CT_JOB_VERB_COMPLETE, err);
    if (r == 0 && (job->cancelled || job->soft_cancelled)) {
        r = ct_err_set(err, -CT_E_STATE, "Job '%s' has been cancelled", job->id);
    }
    if (r == 0) {
        job->complete_req = true;
        pthread_cond_broadcast(&job->cond);
    }
    pthread_mutex_unlock(&job->lock);
    if (r == 0 && job->drv->complete) {
        job->drv->complete(job);
    }
    return r;
}

int ct_job_dismiss(struct ct_job *job, struct ct_err *err)
{
    pthread_mutex_lock(&job->lock);
    int r = verb_check(job, CT_JOB_VERB_DISMISS, err);
    if (r == 0) {
        set_status(job, CT_JOB_STATUS_NULL);
    }
    pthread_mutex_unlock(&job->lock);
    return r;
}

enum ct_job_status ct_job_wait_status(struct ct_job *job, unsigned mask)
{
    pthread_mutex_lock(&job->lock);
    while (!(mask & (1u << job->status))) {
        pthread_cond_wait(&job->cond, &job->lock);
    }
    enum ct_job_status s = job->status;
    pthread_mutex_unlock(&job->lock);
    return s;
}

/* ---- queries ---- */

enum ct_job_status ct_job_get_status(struct ct_job *job)
{
    pthread_mutex_lock(&job->lock);
    enum ct_job_status s = job->status;
    pthread_mutex_unlock(&job->lock);
    return s;
}

const char *ct_job_type(const struct ct_job *job)
{
    return job->drv->type;
}

const char *ct_job_id(const struct ct_job *job)
{
    return job->id;
}

void ct_job_progress(struct ct_job *job, uint64_t *done, uint64_t *total)
{
    pthread_mutex_lock(&job->lock);
    *done = job->done;
    *total = job->total;
    pthread_mutex_unlock(&job->lock);
}

uint64_t ct_job_speed(struct ct_job *job)
{
    pthread_mutex_lock(&job->lock);
    uint64_t s = job->speed;
    pthread_mutex_unlock(&job->lock);
    return s;
}

bool ct_job_is_paused(struct ct_job *job)
{
    pthread_mutex_lock(&job->lock);
    bool p = job->status == CT_JOB_STATUS_PAUSED || job->status == CT_JOB_STATUS_STANDBY;
    pthread_mutex_unlock(&job->lock);
    return p;
}

int ct_job_result(struct ct_job *job, struct ct_err *err)
{
    pthread_mutex_lock(&job->lock);
    int r = result_locked(job, err);
    pthread_mutex_unlock(&job->lock);
    return r;
}

/* ---- for drivers ---- */

/* With lock held: wait out pause requests in status `paused_as`, returning to `back`. */
static void pause_locked(struct ct_job *job, enum ct_job_status paused_as, enum ct_job_status back)
{
    if (job->pause_count == 0 || job->cancelled) {
        return;
    }
    set_status(job, paused_as);
    /* Paused jobs hold no I/O lock. Lock order is io lock, then job->lock: drop ours first. */
    bool relock = job->io_held;
    if (relock) {
        pthread_mutex_unlock(&job->lock);
        io_unlock(job);
        pthread_mutex_lock(&job->lock);
    }
    while (job->pause_count > 0 && !job->cancelled) {
        pthread_cond_wait(&job->cond, &job->lock);
    }
    if (relock) {
        pthread_mutex_unlock(&job->lock);
        io_lock(job);
        pthread_mutex_lock(&job->lock);
    }
    set_status(job, back);
}

int job_pause_point(struct ct_job *job)
{
    /* Let the other users of the images in (cowtreed: guest requests on the node). */
    if (job->io_held) {
        io_unlock(job);
        sched_yield();
        io_lock(job);
    }
    pthread_mutex_lock(&job->lock);
    if (job->status == CT_JOB_STATUS_READY) {
        pause_locked(job, CT_JOB_STATUS_STANDBY, CT_JOB_STATUS_READY);
    } else {
        pause_locked(job, CT_JOB_STATUS_PAUSED, CT_JOB_STATUS_RUNNING);
    }
    int r = job->cancelled ? -ECANCELED : 0;
    pthread_mutex_unlock(&job->lock);
    return r;
}

bool job_has_io_lock(const struct ct_job *job)
{
    return job->io_lock != NULL;
}

bool job_is_cancelled(struct ct_job *job)
{
    pthread_mutex_lock(&job->lock);
    bool c = job->cancelled;
    pthread_mutex_unlock(&job->lock);
    return c;
}

uint64_t job_ratelimit_delay(struct job_ratelimit *rl, uint64_t speed, uint64_t now, uint64_t bytes)
{
    if (speed == 0) {
        return 0;
    }
    if (now >= rl->slice_end_ns) {
        rl->slice_start_ns = now;
        rl->slice_end_ns = now + SLICE_NS;
        rl->dispatched = 0;
    }
    rl->dispatched += bytes;
    uint64_t quota = speed / (1000000000ull / SLICE_NS);
    if (quota == 0) {
        quota = 1;
    }
    if (rl->dispatched <= quota) {
        return 0;
    }
    /* Over quota: the bytes use up (dispatched / quota) whole slices; resume after them. */
    uint64_t slices = rl->dispatched / quota;
    rl->slice_start_ns += slices * SLICE_NS;
    rl->slice_end_ns = rl->slice_start_ns + SLICE_NS;
    rl->dispatched -= slices * quota;
    return rl->slice_start_ns > now ? rl->slice_start_ns - now : 0;
}

int job_ratelimit(struct ct_job *job, uint64_t bytes)
{
    pthread_mutex_lock(&job->lock);
    uint64_t delay = job_ratelimit_delay(&job->rl, job->speed, now_ns(), bytes);
    bool relock = delay && job->io_held;
    if (relock) {
        pthread_mutex_unlock(&job->lock);
        io_unlock(job);
        pthread_mutex_lock(&job->lock);
    }
    if (delay) {
        uint64_t deadline = now_ns() + delay;
        unsigned kick = job->kick;
        struct timespec ts = {.tv_sec = (time_t)(deadline / 1000000000ull),
                              .tv_nsec = (long)(deadline % 1000000000ull)};
        while (!job->cancelled && job->pause_count == 0 && job->kick == kick &&
               now_ns() < deadline) {
            if (pthread_cond_timedwait(&job->cond, &job->lock, &ts) == ETIMEDOUT) {
                break;
            }
        }
        if (job->kick != kick) {
            /* New speed: start accounting afresh. */
            memset(&job->rl, 0, sizeof(job->rl));
        }
    }
    int r = job->cancelled ? -ECANCELED : 0;
    pthread_mutex_unlock(&job->lock);
    if (relock) {
        io_lock(job);
    }
    return r;
}

void job_progress_set_total(struct ct_job *job, uint64_t total)
{
    pthread_mutex_lock(&job->lock);
    job->total = total;
    pthread_mutex_unlock(&job->lock);
}

void job_progress_add_total(struct ct_job *job, uint64_t bytes)
{
    pthread_mutex_lock(&job->lock);
    job->total += bytes;
    pthread_mutex_unlock(&job->lock);
}

void job_progress_update(struct ct_job *job, uint64_t bytes)
{
    pthread_mutex_lock(&job->lock);
    job->done += bytes;
    if (job->done > job->total) {
        job->total = job->done;
    }
    pthread_mutex_unlock(&job->lock);
    if (job->progress_cb) {
        job->progress_cb(job, job->cb_opaque);
    }
}

int job_ready_wait_timeout(struct ct_job *job, uint64_t timeout_ns)
{
    bool relock = job->io_held;
    if (relock) {
        io_unlock(job); /* a READY job waits without the io lock */
    }
    pthread_mutex_lock(&job->lock);
    if (job->status == CT_JOB_STATUS_RUNNING && !job->cancelled) {
        set_status(job, CT_JOB_STATUS_READY);
    }
    uint64_t deadline = timeout_ns ? now_ns() + timeout_ns : 0;
    struct timespec ts = {.tv_sec = (time_t)(deadline / 1000000000ull),
                          .tv_nsec = (long)(deadline % 1000000000ull)};
    unsigned wake = job->wake;
    int r = 0;
    for (;;) {
        if (job->cancelled) {
            r = -ECANCELED;
            break;
        }
        if (job->soft_cancelled) {
            r = 1;
            break;
        }
        if (job->complete_req) {
            break;
        }
        if (job->pause_count > 0) {
            pause_locked(job, CT_JOB_STATUS_STANDBY, CT_JOB_STATUS_READY);
            continue;
        }
        if (deadline && (job->wake != wake || now_ns() >= deadline)) {
            r = 2;
            break;
        }
        if (deadline) {
            pthread_cond_timedwait(&job->cond, &job->lock, &ts);
        } else {
            pthread_cond_wait(&job->cond, &job->lock);
        }
    }
    pthread_mutex_unlock(&job->lock);
    if (relock) {
        io_lock(job);
    }
    return r;
}

int job_ready_wait(struct ct_job *job)
{
    return job_ready_wait_timeout(job, 0);
}

void job_kick(struct ct_job *job)
{
    pthread_mutex_lock(&job->lock);
    job->wake++;
    pthread_cond_broadcast(&job->cond);
    pthread_mutex_unlock(&job->lock);
}
