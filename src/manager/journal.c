/*
 * The journal: every operation that touches more than one file is a plan, a list of steps
 * written to the catalog in one transaction before the first file changes, and executed in
 * order, each step marked done in its own transaction as it completes. The last step is the
 * catalog change itself (SQL), applied together with the plan's completion in one
 * transaction.
 *
 * Invariants:
 *  J1. Every step is idempotent: running it again after it completed, or after it was killed
 *      half-way, leaves the same result (create steps start from scratch on files only the
 *      plan owns; copies only write bytes that the target's view already shows; link changes
 *      and snapshot deletions check first).
 *  J2. Steps that create (overlays, materialized states, internal snapshots, copies) and
 *      unsafe rebases are undoable; all others are irreversible but keep the guest view of
 *      every image that anything still references (commit into an unreferenced base, pull,
 *      removal of unreferenced files, snapshot apply or delete the user asked for).
 *  J3. Planning orders undoable steps first. A failure in an undoable step while only
 *      undoable steps are done undoes them (newest first, the failed one included) and leaves
 *      the catalog untouched: all or nothing. A failure in or after an irreversible step
 *      leaves the plan pending; the next command (or `cowtree recover`) rolls it forward, and
 *      rolls it back when forward fails and J3's condition still holds.
 *  J4. Until the catalog step, the catalog describes the files as they were before the plan;
 *      every command finishes pending plans before it reads the catalog (mgr_open).
 *
 * Plan states: pending -> done | rolledback. A pending plan's steps table is its progress.
 */
#include <errno.h>
#include <sqlite3.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "job/job.h"
#include "manager/manager-int.h"
#include "util/err.h"

static const struct {
    const char *name;
    bool undoable;
} kinds[ST__MAX] = {
    [ST_CREATE_OVERLAY] = {"create-overlay", true},
    [ST_INTERNAL_CREATE] = {"internal-create", true},
    [ST_INTERNAL_APPLY] = {"internal-apply", false},
    [ST_INTERNAL_DELETE] = {"internal-delete", false},
    [ST_MATERIALIZE] = {"materialize", true},
    [ST_COMMIT] = {"commit", false},
    [ST_PULL] = {"pull", false},
    [ST_REBASE] = {"rebase", true},
    [ST_REMOVE] = {"remove", false},
    [ST_COPY] = {"copy", true},
    [ST_CATALOG] = {"catalog", false},
    [ST_LIVE] = {"live", true},
};

const char *step_kind_name(enum m_step_kind k)
{
    return k < ST__MAX ? kinds[k].name : "?";
}

static int kind_from_name(const char *s)
{
    for (int i = 0; i < ST__MAX; i++) {
        if (mgr_streq(kinds[i].name, s)) {
            return i;
        }
    }
    return -1;
}

static bool step_undoable(const struct m_step *s)
{
    if (s->kind == ST_COPY || s->kind == ST_LIVE) {
        return s->n == 0; /* a reused destination was overwritten; live deletes and jobs */
    }
    return kinds[s->kind].undoable;
}

struct mgr_plan *plan_new(const char *op, const char *domain)
{
    struct mgr_plan *p = mgr_xcalloc(1, sizeof(*p));
    p->op = mgr_xstrdup(op);
    p->domain = mgr_xstrdup(domain);
    return p;
}

struct m_step *plan_add(struct mgr_plan *p, enum m_step_kind kind, const char *a, const char *b,
                        const char *c, const char *d, const char *e, int64_t n, uint64_t bytes)
{
    p->steps = mgr_xrealloc(p->steps, (p->ns + 1) * sizeof(*p->steps));
    struct m_step *s = &p->steps[p->ns++];
    memset(s, 0, sizeof(*s));
    s->kind = kind;
    s->a = mgr_xstrdup(a);
    s->b = mgr_xstrdup(b);
    s->c = mgr_xstrdup(c);
    s->d = mgr_xstrdup(d);
    s->e = mgr_xstrdup(e);
    s->n = n;
    s->bytes = bytes;
    return s;
}

void plan_note(struct mgr_plan *p, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *s = NULL;
    if (vasprintf(&s, fmt, ap) < 0) {
        abort();
    }
    va_end(ap);
    p->notes = mgr_xrealloc(p->notes, (p->nnotes + 1) * sizeof(*p->notes));
    p->notes[p->nnotes++] = s;
}

void mgr_plan_free(struct mgr_plan *p)
{
    if (!p) {
        return;
    }
    for (size_t i = 0; i < p->ns; i++) {
        free(p->steps[i].a);
        free(p->steps[i].b);
        free(p->steps[i].c);
        free(p->steps[i].d);
        free(p->steps[i].e);
    }
    free(p->steps);
    for (size_t i = 0; i < p->nnotes; i++) {
        free(p->notes[i]);
    }
    free(p->notes);
    free(p->op);
    free(p->domain);
    free(p);
}

size_t mgr_plan_nsteps(const struct mgr_plan *p)
{
    return p->ns;
}

size_t mgr_plan_nnotes(const struct mgr_plan *p)
{
    return p->nnotes;
}

const char *mgr_plan_note(const struct mgr_plan *p, size_t i)
{
    return p->notes[i];
}

void mgr_plan_step(const struct mgr_plan *p, size_t i, struct mgr_step_view *v)
{
    const struct m_step *s = &p->steps[i];
    memset(v, 0, sizeof(*v));
    v->bytes = s->bytes;
    v->path = s->a;
    switch (s->kind) {
    case ST_CREATE_OVERLAY:
        v->action = "create";
        v->other = s->b;
        v->creates = true;
        break;
    case ST_INTERNAL_CREATE:
        v->action = "snapshot";
        v->name = s->b;
        v->writes = true;
        break;
    case ST_INTERNAL_APPLY:
        v->action = "apply";
        v->name = s->b;
        v->writes = true;
        break;
    case ST_INTERNAL_DELETE:
        v->action = "delete-snapshot";
        v->name = s->b;
        v->writes = true;
        break;
    case ST_MATERIALIZE:
        v->action = "materialize";
        v->other = s->b;
        v->name = s->c;
        v->creates = true;
        break;
    case ST_COMMIT:
        v->action = "commit";
        v->path = s->b;
        v->other = s->a;
        v->writes = true;
        break;
    case ST_PULL:
        v->action = "pull";
        v->other = s->b;
        v->writes = true;
        break;
    case ST_REBASE:
        v->action = "rebase";
        v->other = s->b;
        v->writes = true;
        break;
    case ST_REMOVE:
        v->action = "remove";
        v->removes = true;
        break;
    case ST_COPY:
        v->action = "copy";
        v->path = s->b;
        v->other = s->a;
        v->creates = s->n == 0;
        v->writes = true;
        break;
    case ST_LIVE:
        v->action = "live";
        v->path = s->b;  /* the image concerned, when one stands out */
        v->other = s->a; /* the QMP actions (JSON) */
        v->name = s->c;  /* "commit", "job", or NULL for snapshot actions */
        v->writes = true;
        break;
    case ST_CATALOG:
    case ST__MAX:
        v->action = "catalog";
        v->path = NULL;
        break;
    }
}

/* ---- step execution ---- */

struct progress_ctx {
    struct mgr *m;
    const char *what;
};

static void job_progress(struct ct_job *job, void *opaque)
{
    struct progress_ctx *pc = opaque;
    if (pc->m->opts.progress) {
        uint64_t done, total;
        ct_job_progress(job, &done, &total);
        pc->m->opts.progress(pc->m->opts.opaque, pc->what, done, total);
    }
}

static int run_job(struct mgr *m, struct ct_job *job, struct ct_err *err)
{
    int r = ct_job_run(job, err);
    ct_job_free(job);
    return r;
}

static struct ct_job_opts job_opts(struct mgr *m, struct progress_ctx *pc)
{
    struct ct_job_opts jo = {.speed = m->opts.speed, .progress = job_progress, .opaque = pc};
    return jo;
}

static int open_image(struct ct_image **img, const char *path, const char *fmt, unsigned flags,
                      const char *snapshot, struct ct_err *err)
{
    struct ct_open_opts o = {.format = fmt, .flags = flags, .snapshot = snapshot};
    return ct_image_open(img, path, &o, err);
}

static int close_image(struct ct_image *img, int r, struct ct_err *err)
{
    struct ct_err e2 = {0};
    int c = ct_image_close(img, &e2);
    if (r == 0 && c < 0) {
        if (err) {
            *err = e2;
        }
        return c;
    }
    return r;
}

/* A created file's directory entry made durable before the step counts as done. */
static int sync_created(const char *path, struct ct_err *err)
{
    int r = mgr_sync_dir(path);
    if (r < 0) {
        return ct_err_set(err, r, "cannot make the creation of '%s' durable: %s", path,
                          strerror(-r));
    }
    return 0;
}

static int do_create_overlay(const struct m_step *s, struct ct_err *err)
{
    int r = mgr_unlink(s->a, err);
    if (r < 0) {
        return r;
    }
    struct ct_create_opts o = {
        .format = "qcow2",
        .size = (uint64_t)s->n,
        .size_given = s->n > 0,
        .backing_file = s->b,
        .backing_format = s->b ? s->c : NULL,
    };
    r = ct_image_create(s->a, &o, err);
    if (r < 0) {
        ct_err_prefix(err, "cannot create '%s': ", s->a);
        return r;
    }
    /* Overlays hold guest data: private to the owner (CVE-2025-13193). */
    (void)chmod(s->a, 0600);
    return sync_created(s->a, err);
}

static int do_internal(const struct m_step *s, struct ct_err *err)
{
    struct ct_image *img;
    int r = open_image(&img, s->a, s->c, CT_OPEN_WRITE | CT_OPEN_NO_BACKING, NULL, err);
    if (r < 0) {
        return r;
    }
    int idx = ct_snapshot_find(img, s->b, NULL);
    switch (s->kind) {
    case ST_INTERNAL_CREATE:
        if (idx < 0) {
            struct ct_snapshot_create_opts so = {.date_sec = (uint32_t)s->n};
            r = ct_snapshot_create(img, s->b, &so, err);
        }
        break;
    case ST_INTERNAL_APPLY:
        r = ct_snapshot_apply(img, s->b, err);
        break;
    case ST_INTERNAL_DELETE:
        if (idx >= 0) {
            r = ct_snapshot_delete(img, s->b, err);
        }
        break;
    default:
        r = -EINVAL;
    }
    if (r < 0) {
        ct_err_prefix(err, "%s: ", s->a);
    }
    return close_image(img, r, err);
}

static int do_materialize(struct mgr *m, const struct m_step *s, struct ct_err *err)
{
    int r = mgr_unlink(s->a, err);
    if (r < 0) {
        return r;
    }
    struct ct_create_opts o = {
        .format = "qcow2",
        .size = (uint64_t)s->n,
        .size_given = true,
        .backing_file = s->d,
        .backing_format = s->d ? s->e : NULL,
    };
    r = ct_image_create(s->a, &o, err);
    if (r < 0) {
        ct_err_prefix(err, "cannot create '%s': ", s->a);
        return r;
    }
    (void)chmod(s->a, 0600);
    r = sync_created(s->a, err);
    if (r < 0) {
        return r;
    }
    struct ct_image *src = NULL, *dst = NULL;
    r = open_image(&src, s->b, NULL, CT_OPEN_NO_BACKING, s->c, err);
    if (r == 0) {
        r = open_image(&dst, s->a, "qcow2", CT_OPEN_WRITE, NULL, err);
    }
    const size_t bufsz = 2u << 20;
    uint8_t *buf = r == 0 ? mgr_xmalloc(bufsz) : NULL;
    uint64_t size = 0, total = 0, done = 0;
    if (r == 0) {
        size = ct_image_size(src) < ct_image_size(dst) ? ct_image_size(src) : ct_image_size(dst);
        total = size;
    }
    uint64_t off = 0;
    while (r == 0 && off < size) {
        struct ct_extent e;
        r = ct_image_block_status(src, off, size - off, &e);
        if (r == 0 && e.len == 0) {
            r = -EIO;
        }
        if (r < 0) {
            ct_err_set(err, r, "%s: reading the allocation of snapshot '%s': %s", s->b, s->c,
                       ct_strerror(r));
            break;
        }
        if (e.flags & CT_STATUS_ALLOCATED) {
            if (e.flags & CT_STATUS_ZERO) {
                r = ct_image_pwrite_zeroes(dst, e.len, off, 0);
            } else {
                for (uint64_t p = 0; r == 0 && p < e.len; p += bufsz) {
                    uint64_t n = e.len - p < bufsz ? e.len - p : bufsz;
                    r = ct_image_pread(src, buf, n, off + p);
                    if (r == 0) {
                        r = ct_image_pwrite(dst, buf, n, off + p, 0);
                    }
                }
            }
            if (r < 0) {
                ct_err_set(err, r, "copying snapshot '%s' of '%s' into '%s': %s", s->c, s->b, s->a,
                           ct_strerror(r));
            }
        }
        off += e.len;
        done += e.len;
        if (m->opts.progress) {
            m->opts.progress(m->opts.opaque, "materialize", done, total);
        }
    }
    free(buf);
    if (dst) {
        r = close_image(dst, r, err);
    }
    if (src) {
        ct_image_close(src, NULL);
    }
    return r;
}

static int do_commit(struct mgr *m, const struct m_step *s, struct ct_err *err)
{
    struct ct_image *top = NULL, *base = NULL;
    int r = open_image(&top, s->a, s->d, CT_OPEN_NO_BACKING, NULL, err);
    if (r == 0) {
        r = open_image(&base, s->b, s->c, CT_OPEN_WRITE, NULL, err);
    }
    if (r == 0) {
        struct ct_job *job;
        struct progress_ctx pc = {m, "commit"};
        struct ct_job_opts jo = job_opts(m, &pc);
        struct ct_commit_opts co = {.layers = &top, .nb_layers = 1, .base = base};
        r = ct_job_commit_create(&job, &co, &jo, err);
        if (r == 0) {
            r = run_job(m, job, err);
        }
    }
    if (base) {
        r = close_image(base, r, err);
    }
    if (top) {
        ct_image_close(top, NULL);
    }
    if (r < 0) {
        ct_err_prefix(err, "commit of '%s' into '%s': ", s->a, s->b);
    }
    return r;
}

static bool same_file(const char *a, const char *b)
{
    struct stat sa, sb;
    if (!a || !b) {
        return false;
    }
    if (stat(a, &sa) == 0 && stat(b, &sb) == 0) {
        return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
    }
    return strcmp(a, b) == 0;
}

static int do_pull(struct mgr *m, const struct m_step *s, struct ct_err *err)
{
    struct ct_image *img = NULL;
    int r = open_image(&img, s->a, s->d, CT_OPEN_WRITE, NULL, err);
    if (r < 0) {
        ct_err_prefix(err, "pull into '%s': ", s->a);
        return r;
    }
    struct ct_image *base = NULL;
    if (s->b) {
        for (struct ct_image *l = ct_image_backing(img); l; l = ct_image_backing(l)) {
            if (same_file(ct_image_filename(l), s->b)) {
                base = l;
                break;
            }
        }
        if (!base) {
            close_image(img, 0, NULL);
            return ct_err_set(err, -CT_E_CORRUPT, "pull into '%s': '%s' is not in its chain", s->a,
                              s->b);
        }
    }
    struct ct_job *job;
    struct progress_ctx pc = {m, "pull"};
    struct ct_job_opts jo = job_opts(m, &pc);
    struct ct_stream_opts so = {.img = img, .base = base, .backing = s->b, .backing_fmt = s->c};
    r = ct_job_stream_create(&job, &so, &jo, err);
    if (r == 0) {
        r = run_job(m, job, err);
    }
    r = close_image(img, r, err);
    if (r < 0) {
        ct_err_prefix(err, "pull into '%s': ", s->a);
    }
    return r;
}

static int do_rebase(const char *path, const char *backing, const char *fmt, struct ct_err *err)
{
    struct ct_image *img;
    int r = open_image(&img, path, "qcow2", CT_OPEN_WRITE | CT_OPEN_NO_BACKING, NULL, err);
    if (r < 0) {
        return r;
    }
    r = ct_image_change_backing(img, backing, fmt, err);
    if (r < 0) {
        ct_err_prefix(err, "%s: ", path);
    }
    return close_image(img, r, err);
}

static int do_copy(struct mgr *m, const struct m_step *s, struct ct_err *err)
{
    struct ct_image *src = NULL, *dst = NULL;
    int r = open_image(&src, s->a, NULL, 0, NULL, err);
    if (r < 0) {
        return r;
    }
    if (s->n == 0) {
        r = mgr_unlink(s->b, err);
        struct ct_create_opts o = {
            .format = s->c,
            .size = ct_image_size(src),
            .size_given = true,
            .backing_file = s->d,
            .backing_format = s->d ? s->e : NULL,
        };
        if (r == 0) {
            r = ct_image_create(s->b, &o, err);
        }
        if (r == 0) {
            (void)chmod(s->b, 0600);
            r = sync_created(s->b, err);
        }
    }
    if (r == 0) {
        r = open_image(&dst, s->b, s->c, CT_OPEN_WRITE, NULL, err);
    }
    if (r == 0) {
        struct ct_job *job;
        struct progress_ctx pc = {m, "copy"};
        struct ct_job_opts jo = job_opts(m, &pc);
        struct ct_copy_opts co = {
            .srcs = &src, .nb_srcs = 1, .dst = dst, .dst_is_zero = s->n == 0, .min_sparse = 4096};
        r = ct_job_copy_create(&job, &co, &jo, err);
        if (r == 0) {
            r = run_job(m, job, err);
        }
    }
    if (dst) {
        r = close_image(dst, r, err);
    }
    ct_image_close(src, NULL);
    if (r < 0) {
        ct_err_prefix(err, "copy of '%s' to '%s': ", s->a, s->b);
    }
    return r;
}

static int step_do(struct mgr *m, const struct m_step *s, struct ct_err *err)
{
    switch (s->kind) {
    case ST_CREATE_OVERLAY:
        return do_create_overlay(s, err);
    case ST_INTERNAL_CREATE:
    case ST_INTERNAL_APPLY:
    case ST_INTERNAL_DELETE:
        return do_internal(s, err);
    case ST_MATERIALIZE:
        return do_materialize(m, s, err);
    case ST_COMMIT:
        return do_commit(m, s, err);
    case ST_PULL:
        return do_pull(m, s, err);
    case ST_REBASE:
        return do_rebase(s->a, s->b, s->c, err);
    case ST_REMOVE:
        return mgr_unlink(s->a, err);
    case ST_COPY:
        return do_copy(m, s, err);
    case ST_LIVE:
        return live_step_do(m, s, err);
    case ST_CATALOG:
    case ST__MAX:
        break;
    }
    return ct_err_set(err, -EINVAL, "unknown journal step");
}

int journal_step_do(struct mgr *m, const struct m_step *s, struct ct_err *err)
{
    return step_do(m, s, err);
}

static int step_undo(struct mgr *m, const struct m_step *s, struct ct_err *err)
{
    switch (s->kind) {
    case ST_CREATE_OVERLAY:
    case ST_MATERIALIZE:
        return mgr_unlink(s->a, err);
    case ST_COPY:
        return s->n == 0 ? mgr_unlink(s->b, err) : 0;
    case ST_INTERNAL_CREATE: {
        struct ct_image *img;
        int r = open_image(&img, s->a, s->c, CT_OPEN_WRITE | CT_OPEN_NO_BACKING, NULL, err);
        if (r == -ENOENT) {
            return 0;
        }
        if (r < 0) {
            return r;
        }
        if (ct_snapshot_find(img, s->b, NULL) >= 0) {
            r = ct_snapshot_delete(img, s->b, err);
        }
        return close_image(img, r, err);
    }
    case ST_REBASE:
        return mgr_file_exists(s->a) ? do_rebase(s->a, s->d, s->e, err) : 0;
    case ST_LIVE:
        return live_step_undo(m, s, err);
    default:
        return 0;
    }
}

/* ---- journal storage ---- */

static void kill_point(struct mgr *m)
{
    m->kill_point++;
    if (m->opts.kill_point) {
        m->opts.kill_point(m->opts.opaque, m->kill_point);
    }
}

static int mark_done(struct mgr *m, const struct mgr_plan *p, size_t i, struct ct_err *err)
{
    char *sql = sqlite3_mprintf("UPDATE steps SET done=1 WHERE plan=%lld AND seq=%d",
                                (long long)p->id, (int)i);
    int r = cat_exec(m, sql, err);
    sqlite3_free(sql);
    return r;
}

static int plan_finish_state(struct mgr *m, const struct mgr_plan *p, const char *state,
                             const char *error, struct ct_err *err)
{
    char *sql = sqlite3_mprintf("UPDATE plans SET state=%Q, error=%Q WHERE id=%lld;"
                                "DELETE FROM steps WHERE plan=%lld",
                                state, error, (long long)p->id, (long long)p->id);
    int r = cat_exec_txn(m, sql, err);
    sqlite3_free(sql);
    return r;
}

static int plan_execute(struct mgr *m, struct mgr_plan *p, bool *rolled_back, struct ct_err *err)
{
    *rolled_back = false;
    for (size_t i = 0; i < p->ns; i++) {
        struct m_step *s = &p->steps[i];
        if (s->done) {
            continue;
        }
        int r;
        if (s->kind == ST_CATALOG) {
            char *tail = sqlite3_mprintf("UPDATE plans SET state='done' WHERE id=%lld;"
                                         "DELETE FROM steps WHERE plan=%lld",
                                         (long long)p->id, (long long)p->id);
            char *sql = mgr_xasprintf("%s\n%s", s->a ? s->a : "", tail);
            sqlite3_free(tail);
            r = cat_exec_txn(m, sql, err);
            free(sql);
            if (r < 0) {
                return r;
            }
            s->done = true;
            kill_point(m);
            return 0;
        }
        r = step_do(m, s, err);
        if (r < 0) {
            /* A failed irreversible step may have done part of its work (a pull whose link
             * changed before a later write failed): only forward is safe then. */
            bool undo = step_undoable(s);
            for (size_t j = 0; j < i; j++) {
                if (p->steps[j].done && !step_undoable(&p->steps[j])) {
                    undo = false;
                }
            }
            if (!undo) {
                char *sql = sqlite3_mprintf("UPDATE plans SET error=%Q WHERE id=%lld",
                                            err ? err->msg : "failed", (long long)p->id);
                cat_exec(m, sql, NULL);
                sqlite3_free(sql);
                ct_err_prefix(err,
                              "%s stopped at step %zu of %zu (it will be finished by the next "
                              "cowtree command or `cowtree recover`): ",
                              p->op, i + 1, p->ns);
                return r;
            }
            /* All or nothing (J3): undo this step's partial work and every done step. */
            for (size_t j = i + 1; j-- > 0;) {
                struct m_step *u = &p->steps[j];
                if (j != i && !u->done) {
                    continue;
                }
                struct ct_err ue = {0};
                if (step_undo(m, u, &ue) < 0) {
                    ct_err_prefix(err, "%s failed and could not be undone (%s): ", p->op, ue.msg);
                    return r;
                }
            }
            plan_finish_state(m, p, "rolledback", err ? err->msg : "failed", NULL);
            *rolled_back = true;
            return r;
        }
        kill_point(m);
        r = mark_done(m, p, i, err);
        if (r < 0) {
            return r;
        }
        s->done = true;
        kill_point(m);
    }
    return 0;
}

int plan_run(struct mgr *m, struct mgr_plan *p, const char *sql, struct ct_err *err)
{
    plan_add(p, ST_CATALOG, sql, NULL, NULL, NULL, NULL, 0, 0);
    struct sbuf b = {0};
    char *q = sqlite3_mprintf("INSERT INTO plans(domain, op, created, state) VALUES(%Q, %Q, "
                              "%lld, 'pending')",
                              p->domain, p->op, (long long)time(NULL));
    int r = cat_exec(m, "BEGIN IMMEDIATE", err);
    if (r == 0) {
        /* History: keep the last 1000 finished plans. */
        r = cat_exec(m,
                     "DELETE FROM plans WHERE state != 'pending' AND id <= "
                     "(SELECT max(id) FROM plans) - 1000",
                     err);
    }
    if (r == 0) {
        r = cat_exec(m, q, err);
    }
    sqlite3_free(q);
    if (r == 0) {
        p->id = sqlite3_last_insert_rowid(m->db);
        for (size_t i = 0; i < p->ns; i++) {
            const struct m_step *s = &p->steps[i];
            char *ins = sqlite3_mprintf(
                "INSERT INTO steps(plan, seq, kind, a, b, c, d, e, n, bytes, done) VALUES(%lld, "
                "%d, %Q, %Q, %Q, %Q, %Q, %Q, %lld, %lld, 0);\n",
                (long long)p->id, (int)i, step_kind_name(s->kind), s->a, s->b, s->c, s->d, s->e,
                (long long)s->n, (long long)s->bytes);
            sb_adds(&b, ins);
            sqlite3_free(ins);
        }
        char *all = sb_steal(&b);
        r = cat_exec(m, all, err);
        free(all);
    }
    if (r == 0) {
        r = cat_exec(m, "COMMIT", err);
    } else {
        cat_exec(m, "ROLLBACK", NULL);
    }
    if (r < 0) {
        return r;
    }
    kill_point(m);
    bool rolled_back;
    return plan_execute(m, p, &rolled_back, err);
}

int journal_pending(struct mgr *m, bool *pending, struct ct_err *err)
{
    sqlite3_stmt *st;
    int rc = sqlite3_prepare_v2(m->db, "SELECT count(*) FROM plans WHERE state='pending'", -1, &st,
                                NULL);
    if (rc != SQLITE_OK) {
        return ct_err_set(err, -EIO, "catalog: %s", sqlite3_errmsg(m->db));
    }
    *pending = sqlite3_step(st) == SQLITE_ROW && sqlite3_column_int(st, 0) > 0;
    sqlite3_finalize(st);
    return 0;
}

static char *colstr(sqlite3_stmt *st, int i)
{
    const unsigned char *t = sqlite3_column_text(st, i);
    return t ? mgr_xstrdup((const char *)t) : NULL;
}

static int load_plan(struct mgr *m, int64_t id, struct mgr_plan *p, struct ct_err *err)
{
    sqlite3_stmt *st;
    int rc = sqlite3_prepare_v2(m->db,
                                "SELECT kind, a, b, c, d, e, n, bytes, done FROM steps WHERE "
                                "plan=? ORDER BY seq",
                                -1, &st, NULL);
    if (rc != SQLITE_OK) {
        return ct_err_set(err, -EIO, "catalog: %s", sqlite3_errmsg(m->db));
    }
    sqlite3_bind_int64(st, 1, id);
    int r = 0;
    while (sqlite3_step(st) == SQLITE_ROW) {
        int k = kind_from_name((const char *)sqlite3_column_text(st, 0));
        if (k < 0) {
            r = ct_err_set(err, -CT_E_CORRUPT, "journal plan %lld has an unknown step",
                           (long long)id);
            break;
        }
        struct m_step *s =
            plan_add(p, (enum m_step_kind)k, NULL, NULL, NULL, NULL, NULL,
                     sqlite3_column_int64(st, 6), (uint64_t)sqlite3_column_int64(st, 7));
        s->a = colstr(st, 1);
        s->b = colstr(st, 2);
        s->c = colstr(st, 3);
        s->d = colstr(st, 4);
        s->e = colstr(st, 5);
        s->done = sqlite3_column_int(st, 8) != 0;
    }
    sqlite3_finalize(st);
    return r;
}

int journal_recover(struct mgr *m, unsigned *nplans, struct ct_err *err)
{
    if (nplans) {
        *nplans = 0;
    }
    for (;;) {
        sqlite3_stmt *st;
        int rc = sqlite3_prepare_v2(
            m->db, "SELECT id, op, domain FROM plans WHERE state='pending' ORDER BY id LIMIT 1", -1,
            &st, NULL);
        if (rc != SQLITE_OK) {
            return ct_err_set(err, -EIO, "catalog: %s", sqlite3_errmsg(m->db));
        }
        if (sqlite3_step(st) != SQLITE_ROW) {
            sqlite3_finalize(st);
            return 0;
        }
        int64_t id = sqlite3_column_int64(st, 0);
        char *op = colstr(st, 1), *dom = colstr(st, 2);
        sqlite3_finalize(st);
        struct mgr_plan *p = plan_new(op, dom);
        free(op);
        free(dom);
        p->id = id;
        int r = load_plan(m, id, p, err);
        bool rolled_back = false;
        if (r == 0) {
            r = plan_execute(m, p, &rolled_back, err);
        }
        if (r < 0 && rolled_back) {
            /* Forward failed; undoing it was possible and is done (J3). */
            r = 0;
        }
        if (r < 0) {
            ct_err_prefix(err,
                          "cannot finish the interrupted %s of domain %s (journal plan "
                          "%lld): ",
                          p->op, p->domain ? p->domain : "-", (long long)id);
            mgr_plan_free(p);
            return r;
        }
        /* A plan whose catalog step had already run is complete; make sure it is closed. */
        if (!rolled_back) {
            plan_finish_state(m, p, "done", NULL, NULL);
        }
        mgr_plan_free(p);
        if (nplans) {
            (*nplans)++;
        }
    }
}
