/*
 * Snapshots: create, revert, delete, and the planning machinery they share (struct m_ctx).
 *
 * Every operation loads the catalog model, checks that the domain's files match it, plans
 * on the model (each planned file change is mirrored in the model and in the probe cache, so
 * later decisions in the same plan see the files as they will be), and ends with ctx_finish:
 * the model's SQL becomes the plan's last step and the plan runs through the journal.
 *
 * Semantics (cowtree's answers to what libvirt leaves undone):
 *  S1. Create: internal = a qcow2 snapshot in the disk's top; external = the top becomes the
 *      snapshot's state image (frozen from now on) and a new qcow2 overlay on it the new top.
 *      All disks or none (journal J3).
 *  S2. Revert never writes a file whose active state anything references (invariant R):
 *      external -> a new overlay on the state image; internal -> apply in place when nothing
 *      but the disk reads the holder's active state, else a new overlay on the snapshot's
 *      materialized state (made once, from the snapshot's own clusters, on the holder's
 *      backing file). Old tops nothing references are merged out (removed).
 *  S3. Leaving a state no snapshot captured needs --force: a disk is clean when its top reads
 *      as the current snapshot's state by metadata alone (an empty overlay on the state
 *      image, or the holder itself with no difference to the internal snapshot).
 *  S4. Delete removes the snapshot's references (internal: the qcow2 snapshot goes too), then
 *      merges out each image that lost its last reference (ctx_collapse): the current state
 *      and every remaining snapshot read exactly what they read before.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "manager/manager-int.h"
#include "util/err.h"

void ctx_init(struct m_ctx *x, struct mgr *m)
{
    memset(x, 0, sizeof(*x));
    x->m = m;
}

void ctx_fini(struct m_ctx *x)
{
    if (x->live) {
        m_probe_set_force_share(false);
    }
    free(x->live_dom);
    mgr_strv_free(x->live_tops, x->nlive_tops);
    mgr_strv_free(x->inuse, x->ninuse);
    free(x->extra_sql);
    m_cat_free(x->cat);
    m_probes_free(&x->probes);
    mgr_plan_free(x->plan);
    mgr_strv_free(x->created, x->ncreated);
    memset(x, 0, sizeof(*x));
}

bool ctx_path_taken(struct m_ctx *x, const char *path)
{
    if (mgr_file_exists(path) || m_image_find(x->cat, path)) {
        return true;
    }
    for (size_t i = 0; i < x->ncreated; i++) {
        if (strcmp(x->created[i], path) == 0) {
            return true;
        }
    }
    return false;
}

void ctx_note_created(struct m_ctx *x, const char *path)
{
    x->created = mgr_xrealloc(x->created, (x->ncreated + 1) * sizeof(char *));
    x->created[x->ncreated++] = mgr_xstrdup(path);
}

char *ctx_free_name(struct m_ctx *x, const char *dir, const char *stem, const char *suffix)
{
    char *p = mgr_xasprintf("%s/%s%s", dir, stem, suffix);
    for (unsigned i = 2; ctx_path_taken(x, p); i++) {
        free(p);
        p = mgr_xasprintf("%s/%s%s-%u", dir, stem, suffix, i);
    }
    return p;
}

static int mismatch(struct m_domain *d, struct ct_err *err, const char *fmt, const char *a,
                    const char *b, const char *c)
{
    char msg[4096];
    snprintf(msg, sizeof(msg), fmt, a, b ? b : "(none)", c ? c : "(none)");
    return ct_err_set(err, -CT_E_CORRUPT,
                      "catalog and files disagree: %s; nothing was changed (run `cowtree "
                      "reconcile %s`)",
                      msg, d->name);
}

static int verify_image(struct m_ctx *x, struct m_domain *d, const char *path, char ***seen,
                        size_t *nseen, struct ct_err *err)
{
    for (size_t guard = 0; path && guard < 4096; guard++) {
        for (size_t i = 0; i < *nseen; i++) {
            if (strcmp((*seen)[i], path) == 0) {
                return 0;
            }
        }
        *seen = mgr_xrealloc(*seen, (*nseen + 1) * sizeof(char *));
        (*seen)[(*nseen)++] = mgr_xstrdup(path);
        struct m_image *im = m_image_find(x->cat, path);
        if (!im) {
            return mismatch(d, err, "the catalog has no record of '%s'%s%s", path, "", "");
        }
        if (!mgr_file_exists(path)) {
            return mismatch(d, err, "'%s' is missing (moved or deleted behind cowtree's back)%s%s",
                            path, "", "");
        }
        struct ct_err e2 = {0};
        struct m_probe *pr = m_probe_get(&x->probes, path, im->format, &e2);
        if (!pr) {
            return mismatch(d, err, "'%s' cannot be read as %s: %s", path, im->format, e2.msg);
        }
        if (!mgr_streq(pr->backing, im->backing)) {
            return mismatch(d, err, "'%s' links to backing file %s, the catalog expects %s", path,
                            pr->backing, im->backing);
        }
        if (im->backing && pr->backing_fmt && !mgr_streq(pr->backing_fmt, im->backing_fmt)) {
            return mismatch(d, err, "'%s' names backing format %s, the catalog expects %s", path,
                            pr->backing_fmt, im->backing_fmt);
        }
        path = im->backing;
    }
    return 0;
}

int ctx_verify_domain(struct m_ctx *x, struct m_domain *d, struct ct_err *err)
{
    char **seen = NULL;
    size_t nseen = 0;
    int r = 0;
    if (!x->live_checked) {
        x->live_checked = true;
        bool running;
        r = live_domain_running(x->m, d, &running, err);
        if (r == 0 && running) {
            r = live_ctx_enter(x, d, err);
        }
        if (r < 0) {
            return r;
        }
    }
    for (size_t i = 0; r == 0 && i < d->nd; i++) {
        r = verify_image(x, d, d->disks[i].top, &seen, &nseen, err);
    }
    for (size_t i = 0; r == 0 && i < d->ns; i++) {
        struct m_snap *s = d->snaps[i];
        for (size_t j = 0; r == 0 && j < s->nd; j++) {
            struct m_snapdisk *sd = &s->disks[j];
            if (sd->kind == MK_NO) {
                continue;
            }
            r = verify_image(x, d, sd->image, &seen, &nseen, err);
            if (r == 0 && sd->mat) {
                r = verify_image(x, d, sd->mat, &seen, &nseen, err);
            }
            if (r == 0 && sd->kind == MK_INTERNAL) {
                struct m_probe *pr = m_probe_get(&x->probes, sd->image, NULL, err);
                if (!pr) {
                    r = err ? err->code : -EIO;
                } else if (!m_probe_has_snap(pr, s->name)) {
                    r = mismatch(d, err,
                                 "'%s' holds no internal snapshot named '%s' (snapshot of disk "
                                 "%s)",
                                 sd->image, s->name, sd->target);
                }
            }
        }
    }
    mgr_strv_free(seen, nseen);
    return r;
}

/* Does anything but being a top reference path's active state? */
static bool referenced_except_top(struct m_cat *c, const char *path)
{
    if (m_children(c, path, NULL)) {
        return true;
    }
    for (size_t i = 0; i < c->nd; i++) {
        struct m_domain *d = c->doms[i];
        for (size_t j = 0; !d->removed && j < d->ns; j++) {
            for (size_t k = 0; k < d->snaps[j]->nd; k++) {
                struct m_snapdisk *sd = &d->snaps[j]->disks[k];
                if ((sd->kind == MK_EXTERNAL && mgr_streq(sd->image, path)) ||
                    (sd->kind == MK_INTERNAL && mgr_streq(sd->mat, path))) {
                    return true;
                }
            }
        }
    }
    return false;
}

static const char *fmt_of(struct m_ctx *x, const char *path)
{
    struct m_image *im = m_image_find(x->cat, path);
    return im ? im->format : NULL;
}

/* ---- collapse ---- */

static int collapse_one(struct m_ctx *x, const char *path, bool strict, struct ct_err *err);

int ctx_collapse(struct m_ctx *x, const char *path, bool strict, struct ct_err *err)
{
    if (!path) {
        return 0;
    }
    char *p = mgr_xstrdup(path);
    int r = collapse_one(x, p, strict, err);
    free(p);
    return r;
}

static bool pull_target_ok(struct m_ctx *x, struct m_image *c, struct m_probe *cp)
{
    return c->owned && cp->nsnaps == 0 && mgr_streq(c->format, "qcow2");
}

static int collapse_one(struct m_ctx *x, const char *path, bool strict, struct ct_err *err)
{
    struct m_image *im = m_image_find(x->cat, path);
    if (!im || !im->owned || m_named_by_snapshot(x->cat, path)) {
        return 0;
    }
    struct m_probe *pr = m_probe_get(&x->probes, path, im->format, err);
    if (!pr) {
        return err ? err->code : -EIO;
    }
    if (pr->nsnaps) {
        plan_note(x->plan, "kept %s: it holds %zu internal snapshot(s)", path, pr->nsnaps);
        return 0;
    }
    size_t nch = m_children(x->cat, path, NULL);
    char *backing = mgr_xstrdup(im->backing);
    char *bfmt = mgr_xstrdup(im->backing_fmt);
    int r = 0;
    if (nch == 0) {
        plan_add(x->plan, ST_REMOVE, path, NULL, NULL, NULL, NULL, 0, 0);
        m_image_remove(x->cat, path);
        m_probe_drop(&x->probes, path);
        m_retarget(x->cat, path, NULL); /* snapshot overlay names that named it */
        r = ctx_collapse(x, backing, false, err);
        goto out;
    }
    struct m_image **ch = mgr_xcalloc(nch, sizeof(*ch));
    struct m_probe **cp = mgr_xcalloc(nch, sizeof(*cp));
    size_t k = 0;
    for (size_t i = 0; i < x->cat->ni; i++) {
        if (mgr_streq(x->cat->imgs[i]->backing, path)) {
            ch[k++] = x->cat->imgs[i];
        }
    }
    for (size_t i = 0; i < nch; i++) {
        cp[i] = m_probe_get(&x->probes, ch[i]->path, ch[i]->format, err);
        if (!cp[i]) {
            r = err ? err->code : -EIO;
            goto out2;
        }
    }
    bool all_pull = true;
    const char *blocker = NULL;
    for (size_t i = 0; i < nch; i++) {
        if (!pull_target_ok(x, ch[i], cp[i])) {
            all_pull = false;
            blocker = ch[i]->path;
        }
    }
    bool commit_ok = false;
    uint64_t cost_commit = 0, cost_pull = pr->alloc * nch;
    /* The child takes this image's place: only within one domain's files. */
    if (nch == 1 && ch[0]->owned && cp[0]->nsnaps == 0 && mgr_streq(ch[0]->domain, im->domain)) {
        commit_ok = true;
        cost_commit = cp[0]->alloc;
        for (size_t i = 0; i < x->cat->ni; i++) {
            struct m_image *g = x->cat->imgs[i];
            if (mgr_streq(g->backing, ch[0]->path) && !g->owned) {
                commit_ok = false; /* its child would need a link change: not ours to write */
            }
        }
    }
    if (!commit_ok && !all_pull) {
        if (strict) {
            r = ct_err_set(err, -CT_E_BUSY,
                           "cannot merge '%s' out of its chains: '%s' is based on it and %s; "
                           "delete the snapshots based on it too (--children), or forget the "
                           "snapshot with --metadata (its files stay)",
                           path, blocker,
                           blocker && m_probe_get(&x->probes, blocker, NULL, NULL) &&
                                   m_probe_get(&x->probes, blocker, NULL, NULL)->nsnaps
                               ? "holds internal snapshots that read through it"
                               : "is not an image cowtree may write");
        } else {
            plan_note(x->plan, "kept %s: '%s' is based on it and cannot be rewritten", path,
                      blocker);
        }
        goto out2;
    }
    if (commit_ok && (!all_pull || cost_commit <= cost_pull)) {
        /* Commit the only child into this image, relink the child's children, drop the child:
         * the child's role (top, state image...) moves to this image. */
        char *cpath = mgr_xstrdup(ch[0]->path);
        char *cfmt = mgr_xstrdup(ch[0]->format);
        plan_add(x->plan, ST_COMMIT, cpath, path, im->format, cfmt, NULL, 0, cost_commit);
        for (size_t i = 0; i < x->cat->ni; i++) {
            struct m_image *g = x->cat->imgs[i];
            if (mgr_streq(g->backing, cpath)) {
                plan_add(x->plan, ST_REBASE, g->path, path, im->format, cpath, cfmt, 0, 0);
                struct m_probe *gp = m_probe_get(&x->probes, g->path, g->format, NULL);
                if (gp) {
                    mgr_setstr(&gp->backing, path);
                    mgr_setstr(&gp->backing_fmt, im->format);
                }
            }
        }
        plan_add(x->plan, ST_REMOVE, cpath, NULL, NULL, NULL, NULL, 0, 0);
        pr->alloc += cp[0]->alloc;
        if (cp[0]->size > pr->size) {
            pr->size = cp[0]->size;
        }
        m_image_remove(x->cat, cpath); /* before retargeting: its own link names path */
        m_retarget(x->cat, cpath, path);
        m_probe_drop(&x->probes, cpath);
        for (size_t i = 0; i < x->cat->nd; i++) {
            struct m_domain *d = x->cat->doms[i];
            for (size_t j = 0; j < d->nd; j++) {
                if (strcmp(d->disks[j].top, path) == 0) {
                    mgr_setstr(&d->disks[j].format, im->format);
                }
            }
        }
        free(cpath);
        free(cfmt);
    } else {
        /* Pull this image into each child, then drop it. */
        for (size_t i = 0; i < nch; i++) {
            plan_add(x->plan, ST_PULL, ch[i]->path, backing, bfmt, ch[i]->format, NULL, 0,
                     pr->alloc);
            mgr_setstr(&ch[i]->backing, backing);
            mgr_setstr(&ch[i]->backing_fmt, bfmt);
            cp[i]->alloc += pr->alloc;
            mgr_setstr(&cp[i]->backing, backing);
            mgr_setstr(&cp[i]->backing_fmt, bfmt);
        }
        x->cat->images_dirty = true;
        plan_add(x->plan, ST_REMOVE, path, NULL, NULL, NULL, NULL, 0, 0);
        /* Snapshot overlay names that pointed at it now name its first child. */
        char *first = mgr_xstrdup(ch[0]->path);
        m_image_remove(x->cat, path);
        m_retarget(x->cat, path, first);
        m_probe_drop(&x->probes, path);
        free(first);
    }
out2:
    free(ch);
    free(cp);
out:
    free(backing);
    free(bfmt);
    return r;
}

int ctx_finish(struct m_ctx *x, bool dry_run, struct mgr_plan **plan_out, struct ct_err *err)
{
    m_forget_unused_unowned(x->cat);
    if (!x->plan) {
        x->plan = plan_new("catalog", NULL);
    }
    if (x->live) {
        int lr = live_plan(x, err);
        if (lr < 0) {
            return lr;
        }
    }
    char *sql = cat_sql(x->cat);
    if (x->extra_sql) {
        char *all = mgr_xasprintf("%s\n%s", sql, x->extra_sql);
        free(sql);
        sql = all;
    }
    int r = 0;
    if (dry_run) {
        plan_add(x->plan, ST_CATALOG, NULL, NULL, NULL, NULL, NULL, 0, 0);
    } else if (x->plan->ns == 0) {
        r = cat_exec_txn(x->m, sql, err);
    } else {
        r = plan_run(x->m, x->plan, sql, err);
    }
    free(sql);
    if (plan_out) {
        *plan_out = x->plan;
        x->plan = NULL;
    }
    return r;
}

int ctx_disk_clean(struct m_ctx *x, struct m_domain *d, struct m_disk *disk, bool *clean,
                   struct ct_err *err)
{
    *clean = false;
    struct m_snap *c = m_snap_find(d, d->current);
    struct m_snapdisk *sd = c ? m_snapdisk_find(c, disk->target) : NULL;
    if (!sd || sd->kind == MK_NO) {
        return 0;
    }
    /* Layers that allocate nothing read as their backing file: skip them. */
    const char *p = disk->top;
    for (size_t guard = 0; guard < 4096; guard++) {
        struct m_image *im = m_image_find(x->cat, p);
        if (!im) {
            return 0;
        }
        if (sd->kind == MK_EXTERNAL ? mgr_streq(p, sd->image)
                                    : (mgr_streq(p, sd->image) || mgr_streq(p, sd->mat))) {
            break;
        }
        struct m_probe *pr = m_probe_get(&x->probes, p, im->format, err);
        if (!pr) {
            return err ? err->code : -EIO;
        }
        if (pr->alloc != 0 || !im->backing) {
            return 0;
        }
        p = im->backing;
    }
    if (sd->kind == MK_EXTERNAL || mgr_streq(p, sd->mat)) {
        *clean = true;
        return 0;
    }
    bool differs;
    int r = m_probe_snap_differs(p, fmt_of(x, p), c->name, &differs, err);
    *clean = r == 0 && !differs;
    return r;
}

static int snap_disk_size(const char *path, const char *fmt, const char *name, uint64_t *size,
                          struct ct_err *err)
{
    struct ct_image *img;
    struct ct_open_opts o = {.format = fmt, .flags = CT_OPEN_NO_BACKING};
    int r = ct_image_open(&img, path, &o, err);
    if (r < 0) {
        return r;
    }
    int idx = ct_snapshot_find(img, name, err);
    if (idx < 0) {
        ct_image_close(img, NULL);
        return idx;
    }
    struct ct_snapshot_info si;
    r = ct_snapshot_get(img, (unsigned)idx, &si);
    *size = si.disk_size;
    ct_image_close(img, NULL);
    return r;
}

int ctx_materialize(struct m_ctx *x, struct m_domain *d, struct m_snap *s, struct m_snapdisk *sd,
                    struct ct_err *err)
{
    struct m_image *hold = m_image_find(x->cat, sd->image);
    if (!hold) {
        return ct_err_set(err, -CT_E_CORRUPT, "no catalog record of '%s'", sd->image);
    }
    struct m_probe *pr = m_probe_get(&x->probes, hold->path, hold->format, err);
    if (!pr) {
        return err ? err->code : -EIO;
    }
    uint64_t size = 0;
    int r = snap_disk_size(hold->path, hold->format, s->name, &size, err);
    if (r < 0) {
        return r;
    }
    char *dir = mgr_dirname(hold->path), *stem = mgr_stem(hold->path);
    char *suffix = mgr_xasprintf(".%s-state", s->name);
    char *mpath = ctx_free_name(x, dir, stem, suffix);
    plan_add(x->plan, ST_MATERIALIZE, mpath, hold->path, s->name, hold->backing, hold->backing_fmt,
             (int64_t)size, pr->alloc);
    m_image_add(x->cat, mpath, d->name, sd->target, "qcow2", hold->backing, hold->backing_fmt,
                true);
    struct m_probe *mp =
        m_probe_synth(&x->probes, mpath, "qcow2", size, hold->backing, hold->backing_fmt);
    mp->alloc = pr->alloc;
    ctx_note_created(x, mpath);
    mgr_setstr(&sd->mat, mpath);
    d->dirty = true;
    free(dir);
    free(stem);
    free(suffix);
    free(mpath);
    return 0;
}

bool ctx_snapshot_has_clones(struct m_ctx *x, struct m_domain *d, struct m_snap *s,
                             char **clone_dom)
{
    return m_snap_has_clones(x->cat, d, s, clone_dom);
}

/* ---- common lookups ---- */

static int load_domain(struct m_ctx *x, const char *dom, struct m_domain **d, struct ct_err *err)
{
    int r = cat_load(x->m, &x->cat, err);
    if (r < 0) {
        return r;
    }
    *d = m_domain_find(x->cat, dom);
    if (!*d) {
        return ct_err_set(err, -ENOENT, "Domain not found: no domain with matching name '%s'", dom);
    }
    return 0;
}

static int find_snap(struct m_domain *d, const char *name, struct m_snap **s, struct ct_err *err)
{
    if (!name) {
        *s = m_snap_find(d, d->current);
        if (!*s) {
            return ct_err_set(err, -ENOENT, "domain %s has no current snapshot", d->name);
        }
        return 0;
    }
    *s = m_snap_find(d, name);
    if (!*s) {
        return ct_err_set(err, -ENOENT,
                          "Domain snapshot not found: no domain snapshot with matching name "
                          "'%s'",
                          name);
    }
    return 0;
}

/* ---- create ---- */

struct disk_choice {
    int kind;
    const char *file;
    const char *driver;
};

static int create_core(struct m_ctx *x, struct m_domain *d, const struct mgr_create_opts *o,
                       char **name_out, struct ct_err *err)
{
    char namebuf[32];
    const char *name = o->name;
    int64_t now = (int64_t)time(NULL);
    if (!name) {
        snprintf(namebuf, sizeof(namebuf), "%lld", (long long)now);
        name = namebuf;
    }
    int r = mgr_check_name("snapshot", name, err);
    if (r < 0) {
        return r;
    }
    if (m_snap_find(d, name)) {
        return ct_err_set(err, -EEXIST, "snapshot '%s' already exists for domain %s", name,
                          d->name);
    }
    struct disk_choice *ch = mgr_xcalloc(d->nd, sizeof(*ch));
    for (size_t i = 0; i < d->nd; i++) {
        ch[i].kind = -1;
    }
    for (size_t i = 0; i < o->nspecs; i++) {
        const struct mgr_diskspec *sp = &o->specs[i];
        struct m_disk *k = m_disk_find(d, sp->disk);
        if (!k) {
            r = ct_err_set(err, -ENOENT, "domain %s has no disk '%s'", d->name, sp->disk);
            goto out;
        }
        size_t idx = (size_t)(k - d->disks);
        if (ch[idx].kind != -1 || ch[idx].file) {
            r = ct_err_set(err, -EINVAL, "disk %s is given twice", k->target);
            goto out;
        }
        ch[idx].kind = sp->kind >= 0 ? sp->kind : sp->file ? MGR_KIND_EXTERNAL : -1;
        ch[idx].file = sp->file;
        ch[idx].driver = sp->driver;
        if (ch[idx].kind == -1) {
            ch[idx].kind = -2; /* given without a mode: the default applies */
        }
    }
    bool any = false;
    for (size_t i = 0; i < d->nd; i++) {
        if (ch[i].kind < 0) {
            if (o->disk_only) {
                ch[i].kind = MGR_KIND_EXTERNAL;
            } else if (strcmp(d->disks[i].format, "qcow2") != 0) {
                r = ct_err_set(err, -CT_E_UNSUPPORTED,
                               "internal snapshots need every disk in qcow2 format, and disk %s "
                               "is %s (use --disk-only for an external snapshot, or --diskspec "
                               "%s,snapshot=external|no)",
                               d->disks[i].target, d->disks[i].format, d->disks[i].target);
                goto out;
            } else {
                ch[i].kind = MGR_KIND_INTERNAL;
            }
        }
        if (ch[i].kind == MGR_KIND_INTERNAL && strcmp(d->disks[i].format, "qcow2") != 0) {
            r = ct_err_set(err, -CT_E_UNSUPPORTED, "disk %s is %s: internal snapshots need qcow2",
                           d->disks[i].target, d->disks[i].format);
            goto out;
        }
        if (ch[i].file && ch[i].kind != MGR_KIND_EXTERNAL) {
            r = ct_err_set(err, -EINVAL,
                           "disk %s: a file is only meaningful for an external "
                           "snapshot",
                           d->disks[i].target);
            goto out;
        }
        if (ch[i].driver && ch[i].kind == MGR_KIND_EXTERNAL && strcmp(ch[i].driver, "qcow2") != 0) {
            r = ct_err_set(err, -CT_E_UNSUPPORTED,
                           "disk %s: external snapshot overlays must be qcow2, not '%s'",
                           d->disks[i].target, ch[i].driver);
            goto out;
        }
        any |= ch[i].kind != MGR_KIND_NO;
    }
    if (!any) {
        r = ct_err_set(err, -EINVAL, "the snapshot would capture no disk");
        goto out;
    }
    r = ctx_verify_domain(x, d, err);
    if (r < 0) {
        goto out;
    }
    struct m_snap *s = mgr_xcalloc(1, sizeof(*s));
    s->name = mgr_xstrdup(name);
    s->desc = mgr_xstrdup(o->desc);
    /* libvirt's states: a shut-off domain's snapshots are "shutoff"; a running domain's are
     * "disk-snapshot" when disk-only, else "running". */
    s->state = mgr_xstrdup(!x->live ? "shutoff" : o->disk_only ? "disk-snapshot" : "running");
    s->parent = mgr_xstrdup(d->current);
    s->ctime = now;
    s->seq = x->cat->next_seq++;
    s->valid = true;
    s->disk_only = o->disk_only;
    s->nd = d->nd;
    s->disks = mgr_xcalloc(d->nd, sizeof(*s->disks));
    x->plan = plan_new("snapshot-create", d->name);
    for (size_t i = 0; i < d->nd && r == 0; i++) {
        struct m_disk *k = &d->disks[i];
        struct m_snapdisk *sd = &s->disks[i];
        sd->target = mgr_xstrdup(k->target);
        sd->kind = (enum m_kind)ch[i].kind;
        if (sd->kind == MK_NO) {
            sd->image = mgr_xstrdup(k->top);
            continue;
        }
        struct m_probe *tp = m_probe_get(&x->probes, k->top, k->format, err);
        if (!tp) {
            r = err ? err->code : -EIO;
            break;
        }
        if (sd->kind == MK_INTERNAL) {
            if (m_probe_has_snap(tp, name)) {
                r = ct_err_set(err, -EEXIST,
                               "disk %s: '%s' already holds an internal snapshot named '%s'",
                               k->target, k->top, name);
                break;
            }
            plan_add(x->plan, ST_INTERNAL_CREATE, k->top, name, k->format, NULL, NULL, now, 0);
            m_probe_add_snap(tp, name);
            sd->image = mgr_xstrdup(k->top);
            continue;
        }
        char *ov;
        if (ch[i].file) {
            ov = mgr_abspath(ch[i].file);
            if (!ov) {
                r = ct_err_set(err, -ENOENT, "disk %s: invalid file '%s'", k->target, ch[i].file);
                break;
            }
        } else {
            char *dir = mgr_dirname(k->top), *stem = mgr_stem(k->top);
            ov = mgr_xasprintf("%s/%s.%s", dir, stem, name);
            free(dir);
            free(stem);
        }
        if (strcmp(ov, k->top) == 0 || m_image_find(x->cat, ov)) {
            r = ct_err_set(err, -EEXIST, "disk %s: '%s' is already an image of a domain", k->target,
                           ov);
        } else if (o->reuse_external) {
            struct m_probe *op = m_probe_get(&x->probes, ov, "qcow2", err);
            if (!mgr_file_exists(ov)) {
                r = ct_err_set(err, -ENOENT,
                               "disk %s: '%s' does not exist (--reuse-external needs it)",
                               k->target, ov);
            } else if (!op) {
                ct_err_prefix(err, "disk %s: --reuse-external: ", k->target);
                r = err ? err->code : -EINVAL;
            } else if (!mgr_streq(op->backing, k->top)) {
                r = ct_err_set(err, -EINVAL,
                               "disk %s: '%s' has backing file %s, not the disk's image '%s' "
                               "(--reuse-external needs the right backing)",
                               k->target, ov, op->backing ? op->backing : "(none)", k->top);
            } else if (!mgr_streq(op->backing_fmt, k->format)) {
                r = ct_err_set(
                    err, -EINVAL, "disk %s: '%s' names backing format %s, the disk's image is %s",
                    k->target, ov, op->backing_fmt ? op->backing_fmt : "(none)", k->format);
            } else if (op->nsnaps) {
                r = ct_err_set(err, -EINVAL, "disk %s: '%s' holds internal snapshots", k->target,
                               ov);
            }
        } else if (ctx_path_taken(x, ov)) {
            r = ct_err_set(err, -EEXIST,
                           "disk %s: '%s' already exists (use --reuse-external to use it as the "
                           "overlay)",
                           k->target, ov);
        }
        if (r < 0) {
            free(ov);
            break;
        }
        if (!o->reuse_external) {
            plan_add(x->plan, ST_CREATE_OVERLAY, ov, k->top, k->format, NULL, NULL, 0, 0);
            m_probe_synth(&x->probes, ov, "qcow2", tp->size, k->top, k->format);
            ctx_note_created(x, ov);
        }
        m_image_add(x->cat, ov, d->name, k->target, "qcow2", k->top, k->format, true);
        if (o->no_metadata) {
            /* Nothing will name the frozen image: keep cowtree from ever merging it away. */
            m_image_find(x->cat, k->top)->owned = false;
        }
        sd->image = mgr_xstrdup(k->top);
        sd->file = mgr_xstrdup(ov);
        sd->driver = mgr_xstrdup("qcow2");
        mgr_setstr(&k->top, ov);
        mgr_setstr(&k->format, "qcow2");
        free(ov);
    }
    if (r < 0) {
        m_snap_free(s);
        goto out;
    }
    if (o->no_metadata) {
        m_snap_free(s);
    } else {
        d->snaps = mgr_xrealloc(d->snaps, (d->ns + 1) * sizeof(*d->snaps));
        d->snaps[d->ns++] = s;
        mgr_setstr(&d->current, name);
    }
    d->dirty = true;
    r = ctx_finish(x, false, NULL, err);
    if (r == 0 && name_out) {
        *name_out = mgr_xstrdup(name);
    }
out:
    free(ch);
    return r;
}

int mgr_snapshot_create(struct mgr *m, const char *dom, const struct mgr_create_opts *o,
                        char **name_out, struct ct_err *err)
{
    struct m_ctx x;
    ctx_init(&x, m);
    struct m_domain *d;
    int r = load_domain(&x, dom, &d, err);
    if (r == 0) {
        r = create_core(&x, d, o, name_out, err);
    }
    ctx_fini(&x);
    return r;
}

char *mgr_snapshot_print_xml(const struct mgr_create_opts *o)
{
    struct sbuf b = {0};
    sb_adds(&b, "<domainsnapshot>\n");
    if (o->name) {
        sb_adds(&b, "  <name>");
        sb_add_xml(&b, o->name);
        sb_adds(&b, "</name>\n");
    }
    if (o->desc) {
        sb_adds(&b, "  <description>");
        sb_add_xml(&b, o->desc);
        sb_adds(&b, "</description>\n");
    }
    if (o->nspecs) {
        sb_adds(&b, "  <disks>\n");
        for (size_t i = 0; i < o->nspecs; i++) {
            const struct mgr_diskspec *sp = &o->specs[i];
            sb_adds(&b, "    <disk name='");
            sb_add_xml(&b, sp->disk);
            sb_adds(&b, "'");
            if (sp->kind >= 0) {
                sb_addf(&b, " snapshot='%s'", mgr_kind_name(sp->kind));
            }
            if (!sp->file && !sp->driver) {
                sb_adds(&b, "/>\n");
                continue;
            }
            sb_adds(&b, ">\n");
            if (sp->file) {
                sb_adds(&b, "      <source file='");
                sb_add_xml(&b, sp->file);
                sb_adds(&b, "'/>\n");
            }
            if (sp->driver) {
                sb_adds(&b, "      <driver type='");
                sb_add_xml(&b, sp->driver);
                sb_adds(&b, "'/>\n");
            }
            sb_adds(&b, "    </disk>\n");
        }
        sb_adds(&b, "  </disks>\n");
    }
    sb_adds(&b, "</domainsnapshot>\n");
    return sb_steal(&b);
}

static const char *dom_source(const struct snapxml_in *in, const char *target)
{
    for (size_t i = 0; i < in->ndom; i++) {
        if (strcmp(in->dom_targets[i], target) == 0) {
            return in->dom_sources[i];
        }
    }
    return NULL;
}

static int redefine(struct m_ctx *x, struct m_domain *d, struct snapxml_in *in, bool current,
                    char **name_out, struct ct_err *err)
{
    if (!in->name) {
        return ct_err_set(err, -EINVAL, "a redefined snapshot needs a <name>");
    }
    int r = mgr_check_name("snapshot", in->name, err);
    if (r < 0) {
        return r;
    }
    static const char *const states[] = {"running", "blocked", "paused",       "shutdown",
                                         "shutoff", "crashed", "disk-snapshot"};
    bool state_ok = !in->state;
    for (size_t i = 0; in->state && i < sizeof(states) / sizeof(states[0]); i++) {
        state_ok |= strcmp(in->state, states[i]) == 0;
    }
    if (!state_ok) {
        return ct_err_set(err, -EINVAL, "invalid snapshot state '%s'", in->state);
    }
    if (in->parent) {
        if (!m_snap_find(d, in->parent)) {
            return ct_err_set(err, -ENOENT, "parent snapshot '%s' does not exist", in->parent);
        }
        for (const char *p = in->parent; p;) {
            if (strcmp(p, in->name) == 0) {
                return ct_err_set(err, -EINVAL, "snapshot '%s' cannot be its own ancestor",
                                  in->name);
            }
            struct m_snap *ps = m_snap_find(d, p);
            p = ps ? ps->parent : NULL;
        }
    }
    r = ctx_verify_domain(x, d, err);
    if (r < 0) {
        return r;
    }
    struct m_snap *old = m_snap_find(d, in->name);
    if (old) {
        /* Redefining a known snapshot updates its metadata; its disks stay as recorded. */
        if (in->desc) {
            mgr_setstr(&old->desc, in->desc);
        }
        if (in->parent) {
            mgr_setstr(&old->parent, in->parent);
        }
        if (in->has_ctime) {
            old->ctime = in->ctime;
        }
        if (in->state) {
            mgr_setstr(&old->state, in->state);
        }
    } else {
        struct m_snap *s = mgr_xcalloc(1, sizeof(*s));
        s->name = mgr_xstrdup(in->name);
        s->desc = mgr_xstrdup(in->desc);
        s->state = mgr_xstrdup(in->state ? in->state : "shutoff");
        s->disk_only = mgr_streq(s->state, "disk-snapshot");
        for (size_t i = 0; i < in->nd; i++) {
            s->disk_only |= in->disks[i].kind == MGR_KIND_EXTERNAL;
        }
        s->parent = mgr_xstrdup(in->parent);
        s->ctime = in->has_ctime ? in->ctime : (int64_t)time(NULL);
        s->seq = x->cat->next_seq++;
        s->valid = true;
        s->nd = d->nd;
        s->disks = mgr_xcalloc(d->nd, sizeof(*s->disks));
        for (size_t i = 0; i < d->nd; i++) {
            s->disks[i].target = mgr_xstrdup(d->disks[i].target);
            s->disks[i].kind = MK_NO;
        }
        for (size_t i = 0; i < in->nd && r == 0; i++) {
            struct snapxml_disk *xd = &in->disks[i];
            struct m_disk *k = m_disk_find(d, xd->name);
            if (!k) {
                r = ct_err_set(err, -ENOENT, "domain %s has no disk '%s'", d->name, xd->name);
                break;
            }
            struct m_snapdisk *sd = &s->disks[k - d->disks];
            int kind = xd->kind >= 0 ? xd->kind : xd->file ? MGR_KIND_EXTERNAL : MGR_KIND_INTERNAL;
            sd->kind = (enum m_kind)kind;
            const char *src = dom_source(in, k->target);
            char *state = src ? mgr_abspath(src) : NULL;
            if (kind == MGR_KIND_NO) {
                free(state);
                continue;
            }
            if (kind == MGR_KIND_INTERNAL) {
                if (!state) {
                    state = mgr_xstrdup(k->top);
                }
            } else {
                char *file = xd->file ? mgr_abspath(xd->file) : NULL;
                if (!state && file && mgr_file_exists(file)) {
                    struct m_probe *fp = m_probe_get(&x->probes, file, "qcow2", err);
                    if (!fp) {
                        r = err ? err->code : -EIO;
                    } else {
                        state = mgr_xstrdup(fp->backing);
                    }
                }
                if (r == 0 && !state) {
                    r = ct_err_set(err, -EINVAL,
                                   "disk %s: cannot tell which file holds the snapshot's state "
                                   "(give <domain> with the disk's source, or an existing "
                                   "overlay file)",
                                   k->target);
                }
                sd->file = file;
                sd->driver = mgr_xstrdup(xd->driver ? xd->driver : "qcow2");
            }
            if (r == 0 && !mgr_file_exists(state)) {
                r = ct_err_set(err, -ENOENT, "disk %s: '%s' does not exist", k->target, state);
            }
            if (r == 0 && !m_image_find(x->cat, state)) {
                r = dom_register_chain(x, d->name, k->target, state, NULL, false, err);
            }
            struct m_image *sim = r == 0 ? m_image_find(x->cat, state) : NULL;
            if (r == 0 && kind == MGR_KIND_INTERNAL) {
                struct m_probe *hp = m_probe_get(&x->probes, state, sim->format, err);
                if (!hp) {
                    r = err ? err->code : -EIO;
                } else if (!m_probe_has_snap(hp, s->name)) {
                    r = ct_err_set(err, -CT_E_CORRUPT,
                                   "disk %s: '%s' holds no internal snapshot named '%s'", k->target,
                                   state, s->name);
                }
            }
            if (r == 0 && kind == MGR_KIND_EXTERNAL) {
                for (size_t j = 0; j < d->nd; j++) {
                    if (strcmp(d->disks[j].top, state) == 0) {
                        r = ct_err_set(err, -EINVAL,
                                       "disk %s: '%s' is the disk's active image, it cannot hold "
                                       "an external snapshot's state",
                                       k->target, state);
                    }
                }
            }
            sd->image = state;
        }
        if (r < 0) {
            m_snap_free(s);
            return r;
        }
        d->snaps = mgr_xrealloc(d->snaps, (d->ns + 1) * sizeof(*d->snaps));
        d->snaps[d->ns++] = s;
    }
    if (current) {
        mgr_setstr(&d->current, in->name);
    }
    d->dirty = true;
    r = ctx_finish(x, false, NULL, err);
    if (r == 0 && name_out) {
        *name_out = mgr_xstrdup(in->name);
    }
    return r;
}

int mgr_snapshot_create_xml(struct mgr *m, const char *dom, const char *xml,
                            const struct mgr_create_opts *flags, bool redef, bool current,
                            char **name_out, struct ct_err *err)
{
    struct snapxml_in in;
    int r = snapxml_parse_input(xml, &in, err);
    if (r < 0) {
        return r;
    }
    struct m_ctx x;
    ctx_init(&x, m);
    struct m_domain *d;
    r = load_domain(&x, dom, &d, err);
    if (r == 0 && current && !redef) {
        r = ct_err_set(err, -EINVAL, "--current requires --redefine");
    }
    if (r == 0 && redef) {
        r = redefine(&x, d, &in, current, name_out, err);
    } else if (r == 0) {
        struct mgr_diskspec *specs = mgr_xcalloc(in.nd, sizeof(*specs));
        for (size_t i = 0; i < in.nd; i++) {
            specs[i] = (struct mgr_diskspec){in.disks[i].name, in.disks[i].kind, in.disks[i].file,
                                             in.disks[i].driver};
        }
        struct mgr_create_opts o = *flags;
        o.name = in.name;
        o.desc = in.desc;
        o.specs = specs;
        o.nspecs = in.nd;
        r = create_core(&x, d, &o, name_out, err);
        free(specs);
    }
    ctx_fini(&x);
    snapxml_in_free(&in);
    return r;
}

/* ---- revert ---- */

int mgr_snapshot_revert(struct mgr *m, const char *dom, const char *snap, unsigned flags,
                        struct mgr_plan **plan_out, struct ct_err *err)
{
    struct m_ctx x;
    ctx_init(&x, m);
    struct m_domain *d;
    struct m_snap *t = NULL;
    int r = load_domain(&x, dom, &d, err);
    if (r == 0) {
        r = find_snap(d, snap, &t, err);
    }
    if (r == 0 && !t->valid) {
        r = ct_err_set(err, -CT_E_BUSY,
                       "snapshot %s is invalid: a block job changed data it depends on", t->name);
    }
    if (r == 0) {
        r = ctx_verify_domain(&x, d, err);
    }
    if (r == 0 && x.live) {
        r = ct_err_set(err, -CT_E_BUSY,
                       "cannot revert domain %s while it is running: reverting a running domain "
                       "is not supported yet (the daemon cannot switch a served disk to a "
                       "snapshot's state and there is no memory state to restore); shut it "
                       "down, revert, and start it again",
                       d->name);
    }
    if (r < 0) {
        goto out;
    }
    /* S3: which disks would lose changes no snapshot captured? */
    struct sbuf dirty = {0};
    for (size_t i = 0; i < d->nd && r == 0; i++) {
        struct m_snapdisk *sd = m_snapdisk_find(t, d->disks[i].target);
        if (!sd || sd->kind == MK_NO) {
            continue;
        }
        bool clean;
        r = ctx_disk_clean(&x, d, &d->disks[i], &clean, err);
        if (r == 0 && !clean) {
            sb_addf(&dirty, "%s%s", dirty.len ? ", " : "", d->disks[i].target);
        }
    }
    char *dl = sb_steal(&dirty);
    if (r == 0 && *dl && !(flags & MGR_FORCE)) {
        r = ct_err_set(err, -CT_E_BUSY,
                       "domain %s has changes on disk(s) %s that no snapshot captured; take a "
                       "snapshot first, or use --force to discard them",
                       d->name, dl);
    }
    x.plan = plan_new("snapshot-revert", d->name);
    if (r == 0 && *dl) {
        plan_note(x.plan, "discards the unsaved changes of disk(s) %s", dl);
    }
    free(dl);
    char **old = mgr_xcalloc(d->nd + 1, sizeof(char *));
    size_t nold = 0;
    bool *apply = mgr_xcalloc(d->nd + 1, sizeof(bool));
    /* Pass 1: new files only (undoable). */
    for (size_t i = 0; i < d->nd && r == 0; i++) {
        struct m_disk *k = &d->disks[i];
        struct m_snapdisk *sd = m_snapdisk_find(t, k->target);
        if (!sd || sd->kind == MK_NO) {
            continue;
        }
        const char *base = NULL, *bfmt = NULL;
        if (sd->kind == MK_INTERNAL) {
            bool top_is_holder = strcmp(k->top, sd->image) == 0;
            struct m_image *him = m_image_find(x.cat, sd->image);
            /* A holder that is not the top is written in place only when cowtree owns it:
             * a pinned one may hold the state of a snapshot deleted with --metadata. */
            bool inplace = top_is_holder
                               ? !referenced_except_top(x.cat, sd->image)
                               : him && him->owned && !m_active_referenced(x.cat, sd->image, NULL);
            if (inplace) {
                apply[i] = true;
                continue;
            }
            if (!sd->mat || !m_image_find(x.cat, sd->mat)) {
                r = ctx_materialize(&x, d, t, sd, err);
                if (r < 0) {
                    break;
                }
            }
            base = sd->mat;
            bfmt = "qcow2";
        } else {
            base = sd->image;
            bfmt = fmt_of(&x, base);
        }
        char *dir = mgr_dirname(base), *stem = mgr_stem(base);
        char *suffix = mgr_xasprintf(".%s-revert", t->name);
        char *nov = ctx_free_name(&x, dir, stem, suffix);
        struct m_probe *bp = m_probe_get(&x.probes, base, bfmt, NULL);
        plan_add(x.plan, ST_CREATE_OVERLAY, nov, base, bfmt, NULL, NULL, 0, 0);
        m_probe_synth(&x.probes, nov, "qcow2", bp ? bp->size : 0, base, bfmt);
        ctx_note_created(&x, nov);
        m_image_add(x.cat, nov, d->name, k->target, "qcow2", base, bfmt, true);
        old[nold++] = mgr_xstrdup(k->top);
        mgr_setstr(&k->top, nov);
        mgr_setstr(&k->format, "qcow2");
        free(dir);
        free(stem);
        free(suffix);
        free(nov);
    }
    /* Pass 2: in-place applies (irreversible), then merge out what nothing references. */
    for (size_t i = 0; i < d->nd && r == 0; i++) {
        if (!apply[i]) {
            continue;
        }
        struct m_disk *k = &d->disks[i];
        struct m_snapdisk *sd = m_snapdisk_find(t, k->target);
        const char *hfmt = fmt_of(&x, sd->image);
        plan_add(x.plan, ST_INTERNAL_APPLY, sd->image, t->name, hfmt, NULL, NULL, 0, 0);
        if (strcmp(k->top, sd->image) != 0) {
            old[nold++] = mgr_xstrdup(k->top);
            mgr_setstr(&k->top, sd->image);
            mgr_setstr(&k->format, hfmt);
        }
        struct m_probe *hp = m_probe_get(&x.probes, sd->image, hfmt, NULL);
        if (hp) {
            hp->alloc = 1; /* unknown after the apply; only "not empty" matters */
        }
    }
    mgr_setstr(&d->current, t->name);
    d->dirty = true;
    for (size_t i = 0; i < nold && r == 0; i++) {
        r = ctx_collapse(&x, old[i], false, err);
    }
    mgr_strv_free(old, nold);
    free(apply);
    if (r == 0) {
        r = ctx_finish(&x, (flags & MGR_DRY_RUN) != 0, plan_out, err);
    }
out:
    ctx_fini(&x);
    return r;
}

/* ---- delete ---- */

static void collect_desc(struct m_domain *d, const char *name, struct m_snap ***v, size_t *n)
{
    for (size_t i = 0; i < d->ns; i++) {
        if (mgr_streq(d->snaps[i]->parent, name)) {
            collect_desc(d, d->snaps[i]->name, v, n);
            *v = mgr_xrealloc(*v, (*n + 1) * sizeof(**v));
            (*v)[(*n)++] = d->snaps[i];
        }
    }
}

int mgr_snapshot_delete(struct mgr *m, const char *dom, const char *snap, unsigned flags,
                        struct mgr_plan **plan_out, struct ct_err *err)
{
    struct m_ctx x;
    ctx_init(&x, m);
    struct m_domain *d;
    struct m_snap *s = NULL;
    struct m_snap **del = NULL;
    size_t ndel = 0;
    int r = load_domain(&x, dom, &d, err);
    if (r == 0) {
        r = find_snap(d, snap, &s, err);
    }
    if (r == 0 && (flags & MGR_DELETE_CHILDREN) && (flags & MGR_DELETE_CHILDREN_ONLY)) {
        r = ct_err_set(err, -EINVAL, "--children and --children-only are mutually exclusive");
    }
    if (r < 0) {
        goto out;
    }
    if (flags & (MGR_DELETE_CHILDREN | MGR_DELETE_CHILDREN_ONLY)) {
        collect_desc(d, s->name, &del, &ndel);
    }
    if (!(flags & MGR_DELETE_CHILDREN_ONLY)) {
        del = mgr_xrealloc(del, (ndel + 1) * sizeof(*del));
        del[ndel++] = s;
    }
    for (size_t i = 0; i < ndel && r == 0; i++) {
        char *clone = NULL;
        if (del[i]->protect) {
            r = ct_err_set(err, -CT_E_BUSY,
                           "snapshot %s is protected (snapshot-unprotect it first)", del[i]->name);
        } else if (ctx_snapshot_has_clones(&x, d, del[i], &clone)) {
            r = ct_err_set(err, -CT_E_BUSY,
                           "snapshot %s is the base of linked clone domain %s (flatten or "
                           "undefine the clone first)",
                           del[i]->name, clone);
        }
        free(clone);
    }
    if (r < 0) {
        goto out;
    }
    x.plan = plan_new("snapshot-delete", d->name);
    if (flags & MGR_DELETE_METADATA) {
        for (size_t i = 0; i < ndel; i++) {
            /* The files stay for a later --redefine: never let cowtree merge them away. */
            for (size_t j = 0; j < del[i]->nd; j++) {
                struct m_snapdisk *sd = &del[i]->disks[j];
                /* An internal snapshot stays in its file, which is never removed while it
                 * holds one; an external state image must not be merged away. */
                struct m_image *im =
                    sd->kind == MK_EXTERNAL ? m_image_find(x.cat, sd->image) : NULL;
                struct m_image *mi = sd->mat ? m_image_find(x.cat, sd->mat) : NULL;
                if (im && im->owned) {
                    im->owned = false;
                    x.cat->images_dirty = true;
                }
                if (mi && mi->owned) {
                    mi->owned = false;
                    x.cat->images_dirty = true;
                }
            }
            m_snap_remove(d, del[i]);
        }
        r = ctx_finish(&x, (flags & MGR_DRY_RUN) != 0, plan_out, err);
        goto out;
    }
    r = ctx_verify_domain(&x, d, err);
    for (size_t i = 0; i < ndel && r == 0; i++) {
        struct m_snap *v = del[i];
        char **cand = NULL;
        size_t nc = 0;
        for (size_t j = 0; j < v->nd; j++) {
            struct m_snapdisk *sd = &v->disks[j];
            if (sd->kind == MK_NO) {
                continue;
            }
            cand = mgr_xrealloc(cand, (nc + 2) * sizeof(char *));
            if (sd->kind == MK_INTERNAL) {
                const char *hfmt = fmt_of(&x, sd->image);
                plan_add(x.plan, ST_INTERNAL_DELETE, sd->image, v->name, hfmt, NULL, NULL, 0, 0);
                struct m_probe *hp = m_probe_get(&x.probes, sd->image, hfmt, err);
                if (!hp) {
                    r = err ? err->code : -EIO;
                    break;
                }
                m_probe_del_snap(hp, v->name);
                if (sd->mat) {
                    cand[nc++] = mgr_xstrdup(sd->mat);
                }
            }
            cand[nc++] = mgr_xstrdup(sd->image);
        }
        if (r == 0) {
            m_snap_remove(d, v);
        }
        for (size_t j = 0; j < nc && r == 0; j++) {
            r = ctx_collapse(&x, cand[j], true, err);
        }
        mgr_strv_free(cand, nc);
    }
    if (r == 0) {
        d->dirty = true;
        r = ctx_finish(&x, (flags & MGR_DRY_RUN) != 0, plan_out, err);
    }
out:
    free(del);
    ctx_fini(&x);
    return r;
}

/* ---- metadata-only verbs ---- */

int mgr_snapshot_set_current(struct mgr *m, const char *dom, const char *snap, struct ct_err *err)
{
    struct m_ctx x;
    ctx_init(&x, m);
    struct m_domain *d;
    struct m_snap *s;
    int r = load_domain(&x, dom, &d, err);
    if (r == 0) {
        r = find_snap(d, snap, &s, err);
    }
    if (r == 0) {
        mgr_setstr(&d->current, s->name);
        d->dirty = true;
        r = ctx_finish(&x, false, NULL, err);
    }
    ctx_fini(&x);
    return r;
}

int mgr_snapshot_protect(struct mgr *m, const char *dom, const char *snap, bool on,
                         struct ct_err *err)
{
    struct m_ctx x;
    ctx_init(&x, m);
    struct m_domain *d;
    struct m_snap *s;
    int r = load_domain(&x, dom, &d, err);
    if (r == 0) {
        r = find_snap(d, snap, &s, err);
    }
    char *clone = NULL;
    if (r == 0 && !on && ctx_snapshot_has_clones(&x, d, s, &clone)) {
        r = ct_err_set(err, -CT_E_BUSY,
                       "snapshot %s stays protected while linked clone domain %s depends on it",
                       s->name, clone);
    }
    free(clone);
    if (r == 0) {
        s->protect = on;
        d->dirty = true;
        r = ctx_finish(&x, false, NULL, err);
    }
    ctx_fini(&x);
    return r;
}

int mgr_snapshot_dumpxml(struct mgr *m, const char *dom, const char *snap, char **xml,
                         struct ct_err *err)
{
    struct m_ctx x;
    ctx_init(&x, m);
    struct m_domain *d;
    struct m_snap *s;
    int r = load_domain(&x, dom, &d, err);
    if (r == 0) {
        r = find_snap(d, snap, &s, err);
    }
    if (r == 0) {
        *xml = snapxml_format(d, s);
    }
    ctx_fini(&x);
    return r;
}
