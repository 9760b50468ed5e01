/*
 * Jobs: long-running operations on open images (commit, stream/pull, rebase, copy/convert),
 * with QEMU's job lifecycle, progress, a changeable rate limit, and cooperative pause, resume
 * and cancel.
 *
 * Everything declared in this header is meant to move to the public header (ct-job.h or
 * cowtree.h) as it stands: the names already carry the public ct_job_ prefix. What job
 * implementations need on top of this (the driver vtable, pause points, progress updates) is
 * in job-int.h and stays private.
 *
 * Threading: a job runs in the thread that calls ct_job_run() (synchronously, until it is
 * concluded or waits in PENDING). Every other ct_job_* call may come from any thread at any
 * time; they take the job's lock and take effect at the job's next pause point (between two
 * requests). All state lives in struct ct_job: no globals.
 *
 * Lifetimes: images passed in the *_opts structures are borrowed; they must stay open until
 * ct_job_free(). Strings in the opts are copied.
 */
#ifndef COWTREE_JOB_H
#define COWTREE_JOB_H

#include <stdbool.h>
#include <stdint.h>

#include "cowtree/cowtree.h"

struct ct_job;

/* States; see the diagram and transition table in job.c. */
enum ct_job_status {
    CT_JOB_STATUS_CREATED,   /* made, not started */
    CT_JOB_STATUS_RUNNING,   /* working */
    CT_JOB_STATUS_PAUSED,    /* stopped at a pause point after ct_job_pause() */
    CT_JOB_STATUS_READY,     /* work converged; waits for ct_job_complete() (mirror-like jobs) */
    CT_JOB_STATUS_STANDBY,   /* paused while READY */
    CT_JOB_STATUS_WAITING,   /* done, waiting for the other jobs of a transaction */
    CT_JOB_STATUS_PENDING,   /* done; graph changes not made yet (ct_job_finalize) */
    CT_JOB_STATUS_ABORTING,  /* failed or cancelled; undoing */
    CT_JOB_STATUS_CONCLUDED, /* finished (see ct_job_result); waits for ct_job_dismiss */
    CT_JOB_STATUS_NULL,      /* dismissed */
    CT_JOB_STATUS__MAX,
};

enum ct_job_verb {
    CT_JOB_VERB_CANCEL,
    CT_JOB_VERB_PAUSE,
    CT_JOB_VERB_RESUME,
    CT_JOB_VERB_SET_SPEED,
    CT_JOB_VERB_COMPLETE,
    CT_JOB_VERB_FINALIZE,
    CT_JOB_VERB_DISMISS,
    CT_JOB_VERB__MAX,
};

/* Called from the job's thread after progress moved (between requests, no lock held). It may
 * call ct_job_pause/cancel/set_speed on the job, but not ct_job_resume on a job it paused
 * itself when running synchronously (nobody would be left to resume it). */
typedef void (*ct_job_progress_fn)(struct ct_job *job, void *opaque);
/* Called on every status change with the job's lock held: must not call ct_job_* verbs. */
typedef void (*ct_job_status_fn)(struct ct_job *job, enum ct_job_status status, void *opaque);

struct ct_job_opts {
    const char *id;       /* copied; NULL = the job type */
    uint64_t speed;       /* bytes per second, 0 = unlimited */
    bool manual_finalize; /* stay in PENDING until ct_job_finalize (QEMU auto-finalize=off) */
    bool manual_dismiss;  /* stay CONCLUDED until ct_job_dismiss (QEMU auto-dismiss=off) */
    uint64_t buf_bytes;   /* request size for copying; 0 = 2 MiB (rounded to 64 KiB) */
    ct_job_progress_fn progress;
    ct_job_status_fn on_status;
    void *opaque; /* for the callbacks */
    /* Optional I/O lock for jobs on images that others use at the same time (cowtreed passes
     * the node's lock, so guest requests interleave with the job's): the job holds it while
     * it works and drops it at every pause point, rate-limit sleep and READY wait, and while
     * paused. The final phase (prepare/commit/abort/clean, a mirror's pivot) runs with it
     * held. Both or neither. */
    void (*io_lock)(void *opaque);
    void (*io_unlock)(void *opaque);
};

/* ---- Lifecycle ---- */

/* Run the job in the calling thread: CREATED -> RUNNING -> ... until CONCLUDED (or NULL with
 * auto-dismiss), or PENDING when manual_finalize is set. Returns the job's result: 0,
 * -ECANCELED, or the error that failed it (message in err). */
int ct_job_run(struct ct_job *job, struct ct_err *err);

/* Verbs. Each returns 0, or -CT_E_STATE with a message when the job's state refuses it. */
int ct_job_cancel(struct ct_job *job, bool force, struct ct_err *err);
int ct_job_pause(struct ct_job *job, struct ct_err *err);
int ct_job_resume(struct ct_job *job, struct ct_err *err);
int ct_job_set_speed(struct ct_job *job, uint64_t bytes_per_sec, struct ct_err *err);
int ct_job_complete(struct ct_job *job, struct ct_err *err);
/* From PENDING: prepare, then commit or abort, then clean (runs in the calling thread). */
int ct_job_finalize(struct ct_job *job, struct ct_err *err);
int ct_job_dismiss(struct ct_job *job, struct ct_err *err);

/* Block until the job's status is one of mask (bit i = status i). Returns the status. */
enum ct_job_status ct_job_wait_status(struct ct_job *job, unsigned mask);

/* Free a job that is CREATED (never run), CONCLUDED or NULL. Accepts NULL. */
void ct_job_free(struct ct_job *job);

/* ---- Queries (thread-safe snapshots) ---- */

enum ct_job_status ct_job_get_status(struct ct_job *job);
const char *ct_job_status_name(enum ct_job_status status);
const char *ct_job_verb_name(enum ct_job_verb verb);
const char *ct_job_type(const struct ct_job *job);
const char *ct_job_id(const struct ct_job *job);
/* done and total in bytes; total may grow while the job runs (QEMU's semantics). */
void ct_job_progress(struct ct_job *job, uint64_t *done, uint64_t *total);
uint64_t ct_job_speed(struct ct_job *job);
bool ct_job_is_paused(struct ct_job *job);
/* Result of a concluded job: 0, -ECANCELED or an error; message copied into err if failed. */
int ct_job_result(struct ct_job *job, struct ct_err *err);
/* Is the transition from -> to allowed by the table? (exposed for tests and the daemon) */
bool ct_job_transition_allowed(enum ct_job_status from, enum ct_job_status to);
/* Is verb accepted in status? */
bool ct_job_verb_allowed(enum ct_job_verb verb, enum ct_job_status status);

/* ---- Jobs over images ----
 * All of them keep the guest-visible content of the image the user looks through (the top)
 * unchanged at every instant, so a failed, cancelled or killed job leaves valid images whose
 * top reads as before; only the final link/emptying step changes what other images see.
 */

/* commit: merge layers[0..nb_layers) (top first; each one's backing is the next, the last
 * one's backing is base) into base. Each layer may be opened without its backing
 * (CT_OPEN_NO_BACKING): only what the layers themselves allocate is read. base must be
 * writable, with its own backing chain open. base is grown to the top's size if smaller.
 * After the copy (in prepare): each overlay in overlays[] (writable, whose backing is the top)
 * gets its backing link rewritten to overlay_backing/overlay_backing_fmt, then the top is
 * emptied when empty_top is set (it must then be writable). */
struct ct_commit_opts {
    struct ct_image *const *layers;
    unsigned nb_layers;
    struct ct_image *base;
    bool empty_top;
    struct ct_image *const *overlays;
    unsigned nb_overlays;
    const char *overlay_backing;     /* link string written into each overlay */
    const char *overlay_backing_fmt; /* its format */
};
int ct_job_commit_create(struct ct_job **out, const struct ct_commit_opts *o,
                         const struct ct_job_opts *jo, struct ct_err *err);

/* stream (virsh blockpull): copy into img (writable, chain open) everything its backing chain
 * provides above base (a layer of img's open chain, or NULL for the whole chain), then
 * rewrite img's backing link to backing/backing_fmt (NULL = no backing file). */
struct ct_stream_opts {
    struct ct_image *img;
    struct ct_image *base;
    const char *backing;
    const char *backing_fmt;
};
int ct_job_stream_create(struct ct_job **out, const struct ct_stream_opts *o,
                         const struct ct_job_opts *jo, struct ct_err *err);

/* rebase (safe): img (writable, old backing chain open) gets, in the clusters it does not
 * allocate itself, the old chain's content wherever it differs from new_backing's (a separately
 * opened read-only chain, or NULL for none); then its link becomes backing/backing_fmt. Only
 * regions allocated above the two chains' common ancestor (same file) are compared. */
struct ct_rebase_opts {
    struct ct_image *img;
    struct ct_image *new_backing;
    const char *backing;
    const char *backing_fmt;
    bool compress; /* clusters copied into img are written compressed (qemu-img rebase -c) */
};
int ct_job_rebase_create(struct ct_job **out, const struct ct_rebase_opts *o,
                         const struct ct_job_opts *jo, struct ct_err *err);

/* copy (qemu-img convert): the guest view of srcs[0..nb_srcs) (concatenated) into dst.
 * - dst_is_zero: dst reads as zeros everywhere before the copy (fresh image, or the user says
 *   so): zero regions are not written.
 * - min_sparse: runs of at least this many zero bytes (a multiple of 512) inside data are not
 *   written as data; 0 = write everything (fully allocated).
 * - When dst has a backing chain open (convert -B) and there is one source, only what differs
 *   between the source's view and dst's backing view is written (common ancestors skipped). */
struct ct_copy_opts {
    struct ct_image *const *srcs;
    unsigned nb_srcs;
    struct ct_image *dst;
    bool dst_is_zero;
    uint64_t min_sparse;
    bool compress; /* store data clusters compressed (qcow2 targets; convert -c) */
    /* Parallel copy (convert -m N): up to nb_workers threads, each reading through its own
     * read-only handles of the sources (an image handle is not thread-safe), which it gets
     * from open_src (called in that thread; src_index < nb_srcs; the job closes them). Threads
     * are started one at a time, only while reads hold the copy back. open_src NULL or
     * nb_workers < 2: one request at a time. Not used with compress or a backing file on dst
     * (those stay sequential). */
    unsigned nb_workers;
    int (*open_src)(void *opaque, unsigned src_index, struct ct_image **out, struct ct_err *err);
    void *open_opaque;
    unsigned max_readers; /* worker threads at most; 0: the CPUs less one for a qcow2 target
                           * (its writer is the job's thread), the CPUs for a raw one */
    bool out_of_order;    /* qcow2 target: write chunks as they complete (convert -W) */
    bool copy_offload;    /* raw to raw: copy_file_range, no zero detection in data (convert -C) */
};
int ct_job_copy_create(struct ct_job **out, const struct ct_copy_opts *o,
                       const struct ct_job_opts *jo, struct ct_err *err);

/* mirror (QEMU drive-mirror/blockdev-mirror, and the engine of an active block-commit):
 * make target show src's guest view while src keeps being written.
 * - The initial copy covers what src's chain decides above `base` (a layer of src's open
 *   chain; NULL = the whole chain, sync=full), or nothing when sync_none is set. For an active
 *   commit, base is the commit base and target is that same layer (made writable).
 * - Every write to src after the job is created must be reported with
 *   ct_job_mirror_note_write() (with the io lock held); those ranges are copied again.
 * - Once nothing is left to copy the job is READY (and stays in sync, copying new writes).
 *   ct_job_complete: a final copy of what is left, a flush of target, then pivot(opaque)
 *   with the io lock held (the caller switches its users to target); a failing pivot fails
 *   the job. A cancel (force=false) while READY ends the job successfully without the pivot
 *   (target is a point-in-time copy); any other cancel ends it as cancelled. */
struct ct_mirror_opts {
    struct ct_image *src;
    struct ct_image *target;
    struct ct_image *base;
    bool sync_none;
    bool target_is_zero; /* target reads as zeros before the copy: zero ranges not written */
    int (*pivot)(void *opaque, struct ct_err *err);
    void *pivot_opaque;
};
int ct_job_mirror_create(struct ct_job **out, const struct ct_mirror_opts *o,
                         const struct ct_job_opts *jo, struct ct_err *err);
/* src changed in [off, off+len): copy it again. Call with the job's io lock held. */
void ct_job_mirror_note_write(struct ct_job *job, uint64_t off, uint64_t len);

#endif
