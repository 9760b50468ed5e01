/*
 * Live block jobs in cowtreed: block-commit (intermediate and active), block-stream and
 * drive-mirror over QMP, on nodes whose exports keep serving guest requests.
 *
 * Each job runs in its own thread on the job framework (src/job), with the node's lock as the
 * job's io lock: the job holds it while it copies one request's worth and drops it at every
 * pause point, so guest requests interleave with the job's (J4 of job.c). Guest writes during
 * a mirror or an active commit reach the job through the node's write hook (under the same
 * lock) and are copied again.
 *
 * Graph changes happen with the node's lock held, so no guest request sees a state in
 * between: the pivot of a mirror or active commit inside the job's prepare phase; the removal
 * of committed or streamed layers from the open chain right after the job (the on-disk links
 * were already rewritten by the job, and until the in-memory chain follows, both chains show
 * the same guest view).
 *
 * Events follow QEMU's order: JOB_STATUS_CHANGE for every status, BLOCK_JOB_READY,
 * BLOCK_JOB_PENDING (auto-finalize off), then BLOCK_JOB_COMPLETED or BLOCK_JOB_CANCELLED
 * after the graph changes and before the "concluded" status change.
 *
 * Locks, in order: jobs_lock, then a node's lock, then a job's own lock, then the QMP clients'
 * lock. A job's thread never takes jobs_lock while it holds the node's lock.
 */
#include <errno.h>
#include <json-c/json.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cowtree/job.h"
#include "daemon/export.h"
#include "daemon/qmp.h"
#include "util/err.h"

/* Copy request size: 2 MiB page-cache writes measured up to 10x slower than 256 KiB ones
 * on this kernel (bench/live-jobs), and shorter requests keep guest latency low. */
#define JOB_BUF_BYTES (256u << 10)

struct djob {
    char *id;
    const char *type; /* QEMU's job type: commit, stream, mirror */
    struct node *node;
    struct ct_job *job;
    pthread_t thread;
    bool thread_started;
    bool manual_finalize;

    /* Cached for events sent from the status callback (which may not call ct_job_*). */
    pthread_mutex_t stat_lock;
    uint64_t done, total, speed;

    /* What the job changed and the end of the job must put right (node lock held). */
    struct ct_image *reopened_rw[2]; /* layers made writable for the job: back to read-only */
    struct ct_image *target;         /* mirror target, owned until the pivot */
    bool pivoted;
    /* Intermediate commit and stream: the layers to drop from the open chain on success. */
    struct ct_image *keep_above;  /* the layer whose backing changes (overlay, or the top) */
    struct ct_image *new_backing; /* its new backing (a layer of the chain), or NULL */

    bool after_done;         /* graph changes made and COMPLETED/CANCELLED sent */
    bool deferred_concluded; /* status events held back until then */
    bool deferred_null;
    struct djob *next;
};

static pthread_mutex_t jobs_lock = PTHREAD_MUTEX_INITIALIZER;
static struct djob *jobs;

/* ---- helpers ---- */

static struct djob *find_job(const char *id)
{
    for (struct djob *d = jobs; d; d = d->next) {
        if (strcmp(d->id, id) == 0) {
            return d;
        }
    }
    return NULL;
}

static bool djob_over(struct djob *d)
{
    pthread_mutex_lock(&d->stat_lock);
    bool over = d->after_done;
    pthread_mutex_unlock(&d->stat_lock);
    return over;
}

static void node_io_lock(void *opaque)
{
    struct djob *d = opaque;
    pthread_mutex_lock(&d->node->lock);
}

static void node_io_unlock(void *opaque)
{
    struct djob *d = opaque;
    pthread_mutex_unlock(&d->node->lock);
}

static void mirror_write_hook(void *opaque, uint64_t off, uint64_t len)
{
    ct_job_mirror_note_write(opaque, off, len);
}

/* Same file? Compares resolved paths (the chain stores the paths it opened). */
static bool same_path(const char *a, const char *b)
{
    char ra[PATH_MAX], rb[PATH_MAX];
    if (strcmp(a, b) == 0) {
        return true;
    }
    return realpath(a, ra) && realpath(b, rb) && strcmp(ra, rb) == 0;
}

/* A layer of n's open chain named by the node name (the top) or by its file name. */
static struct ct_image *find_layer(struct node *n, const char *name)
{
    if (strcmp(name, n->name) == 0) {
        return n->img;
    }
    for (struct ct_image *l = n->img; l; l = ct_image_backing(l)) {
        if (same_path(ct_image_filename(l), name)) {
            return l;
        }
    }
    return NULL;
}

/* The layer whose backing is `below` in n's chain, or NULL. */
static struct ct_image *layer_above(struct node *n, struct ct_image *below)
{
    for (struct ct_image *l = n->img; l; l = ct_image_backing(l)) {
        if (ct_image_backing(l) == below) {
            return l;
        }
    }
    return NULL;
}

static const char *arg_either(json_object *args, const char *a, const char *b)
{
    const char *v = qmp_arg_str(args, a);
    return v ? v : qmp_arg_str(args, b);
}

static bool arg_u64(json_object *args, const char *key, uint64_t *out, struct qmp_reply *r)
{
    json_object *v;
    *out = 0;
    if (!args || !json_object_object_get_ex(args, key, &v)) {
        return true;
    }
    if (json_object_get_type(v) != json_type_int || json_object_get_int64(v) < 0) {
        qmp_fail(r, "GenericError", "Parameter '%s' expects a non-negative integer", key);
        return false;
    }
    *out = (uint64_t)json_object_get_int64(v);
    return true;
}

/* ---- events ---- */

static json_object *job_event_data(struct djob *d, uint64_t done, uint64_t total, uint64_t speed)
{
    json_object *o = json_object_new_object();
    json_object_object_add(o, "type", json_object_new_string(d->type));
    json_object_object_add(o, "device", json_object_new_string(d->id));
    json_object_object_add(o, "len", json_object_new_int64((int64_t)total));
    json_object_object_add(o, "offset", json_object_new_int64((int64_t)done));
    json_object_object_add(o, "speed", json_object_new_int64((int64_t)speed));
    return o;
}

static void status_event(struct djob *d, enum ct_job_status st)
{
    json_object *o = json_object_new_object();
    json_object_object_add(o, "id", json_object_new_string(d->id));
    json_object_object_add(o, "status", json_object_new_string(ct_job_status_name(st)));
    qmp_event("JOB_STATUS_CHANGE", o);
}

/* Called by the framework with the job's lock held: no ct_job_* calls here. */
static void on_status(struct ct_job *job, enum ct_job_status st, void *opaque)
{
    (void)job;
    struct djob *d = opaque;
    pthread_mutex_lock(&d->stat_lock);
    if (!d->after_done && (st == CT_JOB_STATUS_CONCLUDED || st == CT_JOB_STATUS_NULL)) {
        *(st == CT_JOB_STATUS_NULL ? &d->deferred_null : &d->deferred_concluded) = true;
        pthread_mutex_unlock(&d->stat_lock);
        return;
    }
    uint64_t done = d->done, total = d->total, speed = d->speed;
    pthread_mutex_unlock(&d->stat_lock);
    status_event(d, st);
    if (st == CT_JOB_STATUS_READY) {
        qmp_event("BLOCK_JOB_READY", job_event_data(d, done, total, speed));
    } else if (st == CT_JOB_STATUS_PENDING && d->manual_finalize) {
        json_object *o = json_object_new_object();
        json_object_object_add(o, "type", json_object_new_string(d->type));
        json_object_object_add(o, "id", json_object_new_string(d->id));
        qmp_event("BLOCK_JOB_PENDING", o);
    }
}

static void on_progress(struct ct_job *job, void *opaque)
{
    struct djob *d = opaque;
    uint64_t done, total;
    ct_job_progress(job, &done, &total);
    pthread_mutex_lock(&d->stat_lock);
    d->done = done;
    d->total = total;
    pthread_mutex_unlock(&d->stat_lock);
}

/* ---- the end of a job: graph changes, then the events held back ---- */

static void djob_after(struct djob *d)
{
    struct ct_err err = {0};
    int ret = ct_job_result(d->job, &err);
    struct node *n = d->node;
    pthread_mutex_lock(&n->lock);
    n->write_hook = NULL;
    n->write_hook_opaque = NULL;
    n->busy_job = NULL;
    if (ret == 0 && d->keep_above) {
        /* The job rewrote keep_above's link to new_backing: drop what lies between. */
        struct ct_image *nb = d->new_backing;
        if (nb) {
            ct_image_swap_backing(layer_above(n, nb), NULL);
        }
        struct ct_image *dropped = ct_image_swap_backing(d->keep_above, nb);
        for (int i = 0; i < 2; i++) {
            for (struct ct_image *l = dropped; l; l = ct_image_backing(l)) {
                if (l == d->reopened_rw[i]) {
                    d->reopened_rw[i] = NULL; /* closed with the dropped layers below */
                }
            }
        }
        ct_image_close(dropped, NULL);
    }
    for (int i = 0; i < 2; i++) {
        /* Back to read-only (QEMU iotest 249), unless it became the node's top. */
        if (d->reopened_rw[i] && d->reopened_rw[i] != n->img) {
            struct ct_err e2 = {0};
            if (ct_image_reopen(d->reopened_rw[i], false, &e2) < 0) {
                fprintf(stderr, "cowtreed: job %s: %s\n", d->id, e2.msg);
            }
        }
        d->reopened_rw[i] = NULL;
    }
    if (d->target && !d->pivoted) {
        ct_image_close(d->target, NULL);
    }
    d->target = NULL;
    pthread_mutex_unlock(&n->lock);

    uint64_t done, total;
    ct_job_progress(d->job, &done, &total);
    json_object *o = job_event_data(d, done, total, ct_job_speed(d->job));
    if (ret == -ECANCELED) {
        qmp_event("BLOCK_JOB_CANCELLED", o);
    } else {
        if (ret < 0) {
            json_object_object_add(o, "error", json_object_new_string(err.msg));
        }
        qmp_event("BLOCK_JOB_COMPLETED", o);
    }
    pthread_mutex_lock(&d->stat_lock);
    d->after_done = true;
    bool c = d->deferred_concluded, z = d->deferred_null;
    pthread_mutex_unlock(&d->stat_lock);
    if (c) {
        status_event(d, CT_JOB_STATUS_CONCLUDED);
    }
    if (z) {
        status_event(d, CT_JOB_STATUS_NULL);
    }
}

static void djob_free(struct djob *d)
{
    ct_job_free(d->job);
    pthread_mutex_destroy(&d->stat_lock);
    free(d->id);
    free(d);
}

/* Unlink and free d if it is dismissed and its thread is gone; jobs_lock held. */
static void reap_locked(struct djob *d)
{
    if (ct_job_get_status(d->job) != CT_JOB_STATUS_NULL || !djob_over(d)) {
        return;
    }
    for (struct djob **pp = &jobs; *pp; pp = &(*pp)->next) {
        if (*pp == d) {
            *pp = d->next;
            break;
        }
    }
    if (d->thread_started) {
        pthread_join(d->thread, NULL);
    }
    djob_free(d);
}

static void *job_thread(void *p)
{
    struct djob *d = p;
    struct ct_err err = {0};
    ct_job_run(d->job, &err);
    enum ct_job_status st = ct_job_get_status(d->job);
    if (st == CT_JOB_STATUS_CONCLUDED || st == CT_JOB_STATUS_NULL) {
        djob_after(d);
    }
    /* (PENDING with manual finalize: job-finalize finishes it.) The thread is joined by
     * whoever reaps the job. */
    return NULL;
}

/* Start a prepared djob (its ct_job made with the djob as opaque). Called with jobs_lock and
 * the node's lock held, releases both; on failure the djob is undone. */
static void drop_djob(struct djob *d);

static int launch_job(struct djob *d, struct qmp_reply *r)
{
    pthread_mutex_unlock(&d->node->lock);
    status_event(d, CT_JOB_STATUS_CREATED);
    d->next = jobs;
    jobs = d;
    int ret = 0;
    if (pthread_create(&d->thread, NULL, job_thread, d) != 0) {
        jobs = d->next;
        ret = qmp_fail(r, "GenericError", "cannot start a thread for job '%s'", d->id);
        pthread_mutex_lock(&d->node->lock);
        drop_djob(d);
    } else {
        d->thread_started = true;
        r->ret = json_object_new_object();
    }
    pthread_mutex_unlock(&jobs_lock);
    return ret;
}

/* Undo a djob that failed before it started (jobs_lock and the node's lock held; both released). */
static int abandon_job(struct djob *d)
{
    drop_djob(d);
    pthread_mutex_unlock(&jobs_lock);
    return -1;
}

/* Common argument handling: job id, speed, auto-finalize/dismiss, a free node. The node's
 * lock is held on success. */
static struct djob *new_djob(json_object *args, const char *type, struct ct_job_opts *jo,
                             struct qmp_reply *r)
{
    struct node *n = qmp_arg_node(args, r);
    if (!n) {
        return NULL;
    }
    const char *id = qmp_arg_str(args, "job-id");
    if (!id) {
        id = n->name;
    }
    uint64_t speed;
    if (!arg_u64(args, "speed", &speed, r)) {
        return NULL;
    }
    if (find_job(id)) {
        qmp_fail(r, "GenericError", "Job ID '%s' already in use", id);
        return NULL;
    }
    if (!n->writable) {
        qmp_fail(r, "GenericError", "Node '%s' is read-only", n->name);
        return NULL;
    }
    struct djob *d = calloc(1, sizeof(*d));
    if (!d || !(d->id = strdup(id))) {
        free(d);
        qmp_fail(r, "GenericError", "out of memory");
        return NULL;
    }
    pthread_mutex_init(&d->stat_lock, NULL);
    d->type = type;
    d->manual_finalize = !qmp_arg_bool(args, "auto-finalize", true);
    d->node = n;
    d->speed = speed;
    *jo = (struct ct_job_opts){.id = d->id,
                               .speed = speed,
                               .manual_finalize = !qmp_arg_bool(args, "auto-finalize", true),
                               .manual_dismiss = !qmp_arg_bool(args, "auto-dismiss", true),
                               .buf_bytes = JOB_BUF_BYTES,
                               .progress = on_progress,
                               .on_status = on_status,
                               .opaque = d,
                               .io_lock = node_io_lock,
                               .io_unlock = node_io_unlock};
    pthread_mutex_lock(&n->lock);
    if (!n->img || n->busy_job) {
        if (n->busy_job) {
            qmp_fail(r, "GenericError",
                     "Node '%s' is busy: block device is in use by block job: %s", n->name,
                     n->busy_job);
        } else {
            qmp_fail(r, "GenericError", "Node '%s' has no image", n->name);
        }
        pthread_mutex_unlock(&n->lock);
        pthread_mutex_destroy(&d->stat_lock);
        free(d->id);
        free(d);
        return NULL;
    }
    n->busy_job = type;
    return d;
}

/* Undo new_djob (node lock held) after a failure before the job started. */
static void drop_djob(struct djob *d)
{
    for (int i = 0; i < 2; i++) {
        if (d->reopened_rw[i]) {
            ct_image_reopen(d->reopened_rw[i], false, NULL);
        }
    }
    if (d->target) {
        ct_image_close(d->target, NULL);
    }
    d->node->write_hook = NULL;
    d->node->write_hook_opaque = NULL;
    d->node->busy_job = NULL;
    pthread_mutex_unlock(&d->node->lock);
    if (d->job) {
        ct_job_free(d->job);
    }
    pthread_mutex_destroy(&d->stat_lock);
    free(d->id);
    free(d);
}

/* Make layer writable for the job, remembering to make it read-only again. */
static int make_writable(struct djob *d, struct ct_image *layer, struct qmp_reply *r)
{
    struct ct_err err = {0};
    if (layer == d->node->img) {
        return 0; /* the node's top is writable already */
    }
    if (ct_image_reopen(layer, true, &err) < 0) {
        return qmp_fail(r, "GenericError", "%s", err.msg);
    }
    d->reopened_rw[d->reopened_rw[0] ? 1 : 0] = layer;
    return 0;
}

/* ---- block-commit ---- */

/* Active commit's pivot, node lock held: the base becomes the node's top; the layers above it
 * are closed (their files stay, as QEMU leaves them). */
static int pivot_to_base(void *opaque, struct ct_err *err)
{
    struct djob *d = opaque;
    struct node *n = d->node;
    struct ct_image *base = d->reopened_rw[0];
    struct ct_image *above = layer_above(n, base);
    if (!above) {
        return ct_err_set(err, -EINVAL, "the commit base left the chain");
    }
    ct_image_swap_backing(above, NULL);
    struct ct_image *old = n->img;
    node_set_image(n, base, ct_image_filename(base), ct_image_format(base));
    d->reopened_rw[0] = NULL; /* stays writable: it is the top now */
    d->pivoted = true;
    int r = ct_image_close(old, err);
    if (r < 0) {
        /* The data is in base (flushed before the pivot); the old top only failed to flush
         * on close. Report it, but the switch is made. */
        fprintf(stderr, "cowtreed: job %s: closing the committed layers: %s\n", d->id, err->msg);
    }
    return 0;
}

static int cmd_block_commit(json_object *args, struct qmp_reply *r)
{
    struct ct_job_opts jo;
    pthread_mutex_lock(&jobs_lock);
    struct djob *d = new_djob(args, "commit", &jo, r);
    if (!d) {
        pthread_mutex_unlock(&jobs_lock);
        return -1;
    }
    struct node *n = d->node;
    const char *top_name = arg_either(args, "top-node", "top");
    const char *base_name = arg_either(args, "base-node", "base");
    const char *backing_file = qmp_arg_str(args, "backing-file");
    struct ct_image *top = top_name ? find_layer(n, top_name) : n->img;
    struct ct_image *base = NULL;
    struct ct_err err = {0};
    if (!top) {
        qmp_fail(r, "GenericError", "Top image '%s' not found in the backing chain of '%s'",
                 top_name, n->name);
        goto fail;
    }
    if (base_name) {
        base = find_layer(n, base_name);
        if (!base) {
            qmp_fail(r, "GenericError", "Base '%s' not found in the backing chain of '%s'",
                     base_name, n->name);
            goto fail;
        }
    } else {
        for (base = top; base && ct_image_backing(base); base = ct_image_backing(base)) {
        }
    }
    if (base == top) {
        qmp_fail(r, "GenericError",
                 top == n->img && !ct_image_backing(top)
                     ? "Device '%s' has no backing file to commit into"
                     : "Top image and base image of '%s' are the same",
                 n->name);
        goto fail;
    }
    bool below = false;
    for (struct ct_image *l = ct_image_backing(top); l; l = ct_image_backing(l)) {
        below |= l == base;
    }
    if (!below) {
        qmp_fail(r, "GenericError", "Base '%s' is not below top '%s'", ct_image_filename(base),
                 ct_image_filename(top));
        goto fail;
    }
    if (make_writable(d, base, r) < 0) {
        goto fail;
    }
    if (top == n->img) {
        if (backing_file) {
            qmp_fail(r, "GenericError", "'backing-file' specified, but 'top' is the active layer");
            goto fail;
        }
        /* Active commit: a mirror of the top's view into base, then the pivot onto base. */
        struct ct_mirror_opts mo = {
            .src = top, .target = base, .base = base, .pivot = pivot_to_base, .pivot_opaque = d};
        if (ct_job_mirror_create(&d->job, &mo, &jo, &err) < 0) {
            qmp_fail(r, "GenericError", "%s", err.msg);
            goto fail;
        }
        n->write_hook = mirror_write_hook;
        n->write_hook_opaque = d->job;
    } else {
        struct ct_image *overlay = layer_above(n, top);
        if (make_writable(d, overlay, r) < 0) {
            goto fail;
        }
        struct ct_image *layers[4096];
        unsigned nl = 0;
        for (struct ct_image *l = top; l != base && nl < 4096; l = ct_image_backing(l)) {
            layers[nl++] = l;
        }
        struct ct_commit_opts co = {.layers = layers,
                                    .nb_layers = nl,
                                    .base = base,
                                    .overlays = &overlay,
                                    .nb_overlays = 1,
                                    .overlay_backing =
                                        backing_file ? backing_file : ct_image_filename(base),
                                    .overlay_backing_fmt = ct_image_format(base)};
        if (ct_job_commit_create(&d->job, &co, &jo, &err) < 0) {
            qmp_fail(r, "GenericError", "%s", err.msg);
            goto fail;
        }
        d->keep_above = overlay;
        d->new_backing = base;
    }
    return launch_job(d, r);
fail:
    return abandon_job(d);
}

/* ---- block-stream ---- */

static int cmd_block_stream(json_object *args, struct qmp_reply *r)
{
    struct ct_job_opts jo;
    pthread_mutex_lock(&jobs_lock);
    struct djob *d = new_djob(args, "stream", &jo, r);
    if (!d) {
        pthread_mutex_unlock(&jobs_lock);
        return -1;
    }
    struct node *n = d->node;
    const char *base_name = arg_either(args, "base-node", "base");
    const char *backing_file = qmp_arg_str(args, "backing-file");
    struct ct_image *base = NULL;
    struct ct_err err = {0};
    if (base_name) {
        base = find_layer(n, base_name);
        if (!base || base == n->img) {
            qmp_fail(r, "GenericError", "Node '%s' is not a backing image of '%s'", base_name,
                     n->name);
            goto fail;
        }
    }
    if (backing_file && !base) {
        qmp_fail(r, "GenericError", "backing file specified, but streaming the entire chain");
        goto fail;
    }
    struct ct_stream_opts so = {
        .img = n->img,
        .base = base,
        .backing = base ? (backing_file ? backing_file : ct_image_filename(base)) : NULL,
        .backing_fmt = base ? ct_image_format(base) : NULL};
    if (ct_job_stream_create(&d->job, &so, &jo, &err) < 0) {
        qmp_fail(r, "GenericError", "%s", err.msg);
        goto fail;
    }
    d->keep_above = n->img;
    d->new_backing = base;
    return launch_job(d, r);
fail:
    return abandon_job(d);
}

/* ---- drive-mirror ---- */

/* Mirror's pivot, node lock held: the target becomes the node's image; the source chain is
 * closed (its files stay). */
static int pivot_to_target(void *opaque, struct ct_err *err)
{
    struct djob *d = opaque;
    struct node *n = d->node;
    struct ct_image *old = n->img;
    node_set_image(n, d->target, ct_image_filename(d->target), ct_image_format(d->target));
    d->pivoted = true;
    if (ct_image_close(old, err) < 0) {
        fprintf(stderr, "cowtreed: job %s: closing the mirror source: %s\n", d->id, err->msg);
    }
    return 0;
}

/* blockdev-mirror: the target is a node added with blockdev-add (writable, not exported). It
 * leaves the node list when the job starts: the job owns its image, the device's node reads
 * from it after the pivot, a cancel closes it. */
static int cmd_blockdev_mirror(json_object *args, struct qmp_reply *r)
{
    struct ct_job_opts jo;
    const char *target = qmp_arg_str(args, "target");
    const char *sync = qmp_arg_str(args, "sync");
    if (!target) {
        return qmp_fail(r, "GenericError", "Parameter 'target' is missing");
    }
    if (!sync || (strcmp(sync, "full") && strcmp(sync, "top"))) {
        return qmp_fail(r, "GenericError",
                        sync ? "Parameter 'sync' does not accept value '%s' (full or top)"
                             : "Parameter 'sync' is missing%s",
                        sync ? sync : "");
    }
    pthread_mutex_lock(&jobs_lock);
    struct node *src = qmp_arg_node(args, r);
    if (!src) {
        pthread_mutex_unlock(&jobs_lock);
        return -1;
    }
    if (!strcmp(src->name, target)) {
        pthread_mutex_unlock(&jobs_lock);
        return qmp_fail(r, "GenericError", "cannot mirror '%s' onto itself", target);
    }
    struct ct_image *timg;
    struct ct_err err = {0};
    if (node_take(target, &timg, &err) < 0) {
        pthread_mutex_unlock(&jobs_lock);
        return qmp_fail(r, err.code == -ENOENT ? "DeviceNotFound" : "GenericError", "%s", err.msg);
    }
    struct djob *d = new_djob(args, "mirror", &jo, r);
    if (!d) {
        ct_image_close(timg, NULL);
        pthread_mutex_unlock(&jobs_lock);
        return -1;
    }
    struct node *n = d->node;
    d->target = timg;
    if (ct_image_size(timg) != ct_image_size(n->img)) {
        qmp_fail(r, "GenericError", "Source and target image have different sizes");
        goto fail;
    }
    struct ct_mirror_opts mo = {.src = n->img,
                                .target = timg,
                                .base = !strcmp(sync, "top") ? ct_image_backing(n->img) : NULL,
                                .pivot = pivot_to_target,
                                .pivot_opaque = d};
    if (ct_job_mirror_create(&d->job, &mo, &jo, &err) < 0) {
        qmp_fail(r, "GenericError", "%s", err.msg);
        goto fail;
    }
    n->write_hook = mirror_write_hook;
    n->write_hook_opaque = d->job;
    return launch_job(d, r);
fail:
    return abandon_job(d);
}

static int cmd_drive_mirror(json_object *args, struct qmp_reply *r)
{
    struct ct_job_opts jo;
    const char *target = qmp_arg_str(args, "target");
    const char *sync = qmp_arg_str(args, "sync");
    const char *mode = qmp_arg_str(args, "mode");
    const char *format = qmp_arg_str(args, "format");
    if (!target) {
        return qmp_fail(r, "GenericError", "Parameter 'target' is missing");
    }
    if (!sync) {
        return qmp_fail(r, "GenericError", "Parameter 'sync' is missing");
    }
    bool full = !strcmp(sync, "full"), top = !strcmp(sync, "top"), none = !strcmp(sync, "none");
    if (!full && !top && !none) {
        return qmp_fail(r, "GenericError",
                        "Parameter 'sync' does not accept value '%s' (full, top or none)", sync);
    }
    bool existing = mode && !strcmp(mode, "existing");
    if (mode && !existing && strcmp(mode, "absolute-paths") != 0) {
        return qmp_fail(r, "GenericError",
                        "Parameter 'mode' does not accept value '%s' (existing or "
                        "absolute-paths)",
                        mode);
    }
    pthread_mutex_lock(&jobs_lock);
    struct djob *d = new_djob(args, "mirror", &jo, r);
    if (!d) {
        pthread_mutex_unlock(&jobs_lock);
        return -1;
    }
    struct node *n = d->node;
    struct ct_err err = {0};
    struct ct_image *src_backing = ct_image_backing(n->img);
    if (!format) {
        format = existing ? NULL : n->format;
    }
    if (same_path(target, n->file)) {
        qmp_fail(r, "GenericError", "cannot mirror '%s' onto itself", n->name);
        goto fail;
    }
    if (!existing) {
        struct ct_create_opts co = {.format = format,
                                    .size = ct_image_size(n->img),
                                    .size_given = true,
                                    .no_open_backing = true};
        if (top && src_backing) {
            co.backing_file = ct_image_filename(src_backing);
            co.backing_format = ct_image_format(src_backing);
        } else if (none) {
            co.backing_file = n->file;
            co.backing_format = n->format;
        }
        if (access(target, F_OK) == 0) {
            qmp_fail(r, "GenericError", "'%s' already exists (use mode 'existing' to reuse it)",
                     target);
            goto fail;
        }
        if (ct_image_create(target, &co, &err) < 0) {
            qmp_fail(r, "GenericError", "%s", err.msg);
            goto fail;
        }
    }
    /* sync=none: the target's backing is the source itself, which this process holds
     * writable; the target is opened without it (it is only written; no pivot, see docs). */
    struct ct_open_opts oo = {.format = format,
                              .flags = CT_OPEN_WRITE | (none ? CT_OPEN_NO_BACKING : 0)};
    if (ct_image_open(&d->target, target, &oo, &err) < 0) {
        qmp_fail(r, "GenericError", "%s", err.msg);
        if (!existing) {
            unlink(target);
        }
        goto fail;
    }
    struct ct_mirror_opts mo = {.src = n->img,
                                .target = d->target,
                                .base = top ? src_backing : NULL,
                                .sync_none = none,
                                .target_is_zero = !existing && full,
                                .pivot = none ? NULL : pivot_to_target,
                                .pivot_opaque = d};
    if (ct_job_mirror_create(&d->job, &mo, &jo, &err) < 0) {
        qmp_fail(r, "GenericError", "%s", err.msg);
        goto fail;
    }
    n->write_hook = mirror_write_hook;
    n->write_hook_opaque = d->job;
    return launch_job(d, r);
fail:
    return abandon_job(d);
}

/* ---- queries and verbs ---- */

static int cmd_query_block_jobs(json_object *args, struct qmp_reply *r)
{
    (void)args;
    json_object *arr = json_object_new_array();
    pthread_mutex_lock(&jobs_lock);
    for (struct djob *d = jobs; d; d = d->next) {
        enum ct_job_status st = ct_job_get_status(d->job);
        if (st == CT_JOB_STATUS_NULL) {
            continue;
        }
        uint64_t done, total;
        ct_job_progress(d->job, &done, &total);
        json_object *o = job_event_data(d, done, total, ct_job_speed(d->job));
        json_object_object_add(o, "busy", json_object_new_boolean(st == CT_JOB_STATUS_RUNNING));
        json_object_object_add(o, "paused", json_object_new_boolean(ct_job_is_paused(d->job)));
        json_object_object_add(o, "io-status", json_object_new_string("ok"));
        json_object_object_add(
            o, "ready",
            json_object_new_boolean(st == CT_JOB_STATUS_READY || st == CT_JOB_STATUS_STANDBY));
        json_object_object_add(o, "status", json_object_new_string(ct_job_status_name(st)));
        struct ct_err err = {0};
        if (st == CT_JOB_STATUS_CONCLUDED && ct_job_result(d->job, &err) < 0 &&
            ct_job_result(d->job, NULL) != -ECANCELED) {
            json_object_object_add(o, "error", json_object_new_string(err.msg));
        }
        json_object_array_add(arr, o);
    }
    pthread_mutex_unlock(&jobs_lock);
    r->ret = arr;
    return 0;
}

static int cmd_query_jobs(json_object *args, struct qmp_reply *r)
{
    (void)args;
    json_object *arr = json_object_new_array();
    pthread_mutex_lock(&jobs_lock);
    for (struct djob *d = jobs; d; d = d->next) {
        enum ct_job_status st = ct_job_get_status(d->job);
        if (st == CT_JOB_STATUS_NULL) {
            continue;
        }
        uint64_t done, total;
        ct_job_progress(d->job, &done, &total);
        json_object *o = json_object_new_object();
        json_object_object_add(o, "id", json_object_new_string(d->id));
        json_object_object_add(o, "type", json_object_new_string(d->type));
        json_object_object_add(o, "status", json_object_new_string(ct_job_status_name(st)));
        json_object_object_add(o, "current-progress", json_object_new_int64((int64_t)done));
        json_object_object_add(o, "total-progress", json_object_new_int64((int64_t)total));
        struct ct_err err = {0};
        if (st == CT_JOB_STATUS_CONCLUDED && ct_job_result(d->job, &err) < 0) {
            json_object_object_add(o, "error", json_object_new_string(err.msg));
        }
        json_object_array_add(arr, o);
    }
    pthread_mutex_unlock(&jobs_lock);
    r->ret = arr;
    return 0;
}

enum verb {
    V_CANCEL,
    V_CANCEL_FORCE,
    V_PAUSE,
    V_RESUME,
    V_COMPLETE,
    V_SPEED,
    V_FINALIZE,
    V_DISMISS
};

static int job_verb(json_object *args, struct qmp_reply *r, const char *idkey, enum verb v)
{
    const char *id = qmp_arg_str(args, idkey);
    if (!id) {
        return qmp_fail(r, "GenericError", "Parameter '%s' is missing", idkey);
    }
    uint64_t speed = 0;
    if (v == V_SPEED) {
        json_object *s;
        if (!args || !json_object_object_get_ex(args, "speed", &s)) {
            return qmp_fail(r, "GenericError", "Parameter 'speed' is missing");
        }
        if (!arg_u64(args, "speed", &speed, r)) {
            return -1;
        }
    }
    pthread_mutex_lock(&jobs_lock);
    struct djob *d = find_job(id);
    if (!d || ct_job_get_status(d->job) == CT_JOB_STATUS_NULL) {
        pthread_mutex_unlock(&jobs_lock);
        return qmp_fail(r, "DeviceNotActive", "Block job '%s' not found", id);
    }
    struct ct_err err = {0};
    int ret = 0;
    switch (v) {
    case V_CANCEL:
    case V_CANCEL_FORCE: {
        enum ct_job_status st = ct_job_get_status(d->job);
        ret =
            ct_job_cancel(d->job, v == V_CANCEL_FORCE || qmp_arg_bool(args, "force", false), &err);
        if (ret == 0 && st == CT_JOB_STATUS_PENDING) {
            djob_after(d); /* the abort ran here: the job's thread is gone */
        }
        break;
    }
    case V_PAUSE:
        ret = ct_job_pause(d->job, &err);
        break;
    case V_RESUME:
        ret = ct_job_resume(d->job, &err);
        break;
    case V_COMPLETE:
        if (!strcmp(d->type, "mirror") && !d->target) {
            ret = ct_err_set(&err, -EINVAL, "Job '%s' has no target to pivot to", id);
        } else if (ct_job_get_status(d->job) != CT_JOB_STATUS_READY) {
            ret = ct_err_set(&err, -EINVAL,
                             "The active block job '%s' cannot be completed (not ready yet)", id);
        } else {
            ret = ct_job_complete(d->job, &err);
        }
        break;
    case V_SPEED:
        ret = ct_job_set_speed(d->job, speed, &err);
        if (ret == 0) {
            pthread_mutex_lock(&d->stat_lock);
            d->speed = speed;
            pthread_mutex_unlock(&d->stat_lock);
        }
        break;
    case V_FINALIZE: {
        enum ct_job_status st = ct_job_get_status(d->job);
        ret = ct_job_finalize(d->job, &err);
        if (st == CT_JOB_STATUS_PENDING) {
            ret = 0; /* the job's own failure is reported by its events */
            djob_after(d);
        }
        break;
    }
    case V_DISMISS:
        ret = ct_job_dismiss(d->job, &err);
        if (ret == 0) {
            reap_locked(d);
        }
        break;
    }
    pthread_mutex_unlock(&jobs_lock);
    if (ret < 0) {
        return qmp_fail(r, "GenericError", "%s", err.msg);
    }
    r->ret = json_object_new_object();
    return 0;
}

/* Commands: the ones that start or list jobs have a function; the verbs name the argument
 * that carries the job id (QEMU's legacy block-job-* commands call it "device"). */
static const struct {
    const char *name;
    int (*fn)(json_object *args, struct qmp_reply *r);
    const char *idkey;
    enum verb verb;
} job_commands[] = {
    {"block-commit", cmd_block_commit, NULL, 0},
    {"block-stream", cmd_block_stream, NULL, 0},
    {"drive-mirror", cmd_drive_mirror, NULL, 0},
    {"blockdev-mirror", cmd_blockdev_mirror, NULL, 0},
    {"query-block-jobs", cmd_query_block_jobs, NULL, 0},
    {"query-jobs", cmd_query_jobs, NULL, 0},
    {"block-job-cancel", NULL, "device", V_CANCEL},
    {"block-job-pause", NULL, "device", V_PAUSE},
    {"block-job-resume", NULL, "device", V_RESUME},
    {"block-job-complete", NULL, "device", V_COMPLETE},
    {"block-job-set-speed", NULL, "device", V_SPEED},
    {"block-job-finalize", NULL, "id", V_FINALIZE},
    {"block-job-dismiss", NULL, "id", V_DISMISS},
    {"job-cancel", NULL, "id", V_CANCEL_FORCE},
    {"job-pause", NULL, "id", V_PAUSE},
    {"job-resume", NULL, "id", V_RESUME},
    {"job-complete", NULL, "id", V_COMPLETE},
    {"job-finalize", NULL, "id", V_FINALIZE},
    {"job-dismiss", NULL, "id", V_DISMISS},
};

bool blockjob_dispatch(const char *cmd, json_object *args, struct qmp_reply *r)
{
    for (size_t i = 0; i < sizeof(job_commands) / sizeof(job_commands[0]); i++) {
        if (!strcmp(cmd, job_commands[i].name)) {
            if (job_commands[i].fn) {
                job_commands[i].fn(args, r);
            } else {
                job_verb(args, r, job_commands[i].idkey, job_commands[i].verb);
            }
            /* Free the jobs that were dismissed (automatically or not) and are over. */
            pthread_mutex_lock(&jobs_lock);
            for (struct djob *d = jobs, *next; d; d = next) {
                next = d->next;
                reap_locked(d);
            }
            pthread_mutex_unlock(&jobs_lock);
            return true;
        }
    }
    return false;
}

void blockjob_cancel_all(void)
{
    pthread_mutex_lock(&jobs_lock);
    for (struct djob *d = jobs; d; d = d->next) {
        ct_job_cancel(d->job, true, NULL);
    }
    struct djob *list = jobs;
    jobs = NULL;
    pthread_mutex_unlock(&jobs_lock);
    for (struct djob *d = list; d;) {
        struct djob *next = d->next;
        if (d->thread_started) {
            pthread_join(d->thread, NULL);
        }
        enum ct_job_status st = ct_job_get_status(d->job);
        if (st == CT_JOB_STATUS_PENDING) {
            ct_job_cancel(d->job, true, NULL);
        }
        if (!djob_over(d)) {
            djob_after(d);
        }
        djob_free(d);
        d = next;
    }
}
