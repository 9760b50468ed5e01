/*
 * Block jobs on a domain that is not running (blockcommit, blockpull, blockcopy), linked
 * clones, and reconcile. The bytes move through the job framework (src/job/): commit, stream
 * and copy jobs, one journal step each.
 *
 * The catalog is kept true (B1): a job that changes the data some snapshot reads is refused
 * with the list of those snapshots, or with --force marks them invalid (revert refuses an
 * invalid snapshot; delete still merges its files away safely). Images of other domains and
 * images no snapshot names but that another branch reads are never changed: refused always.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "manager/manager-int.h"
#include "util/err.h"

static int load(struct m_ctx *x, const char *dom, const char *disk, struct m_domain **d,
                struct m_disk **k, unsigned flags, struct ct_err *err)
{
    int r = cat_load(x->m, &x->cat, err);
    if (r < 0) {
        return r;
    }
    *d = m_domain_find(x->cat, dom);
    if (!*d) {
        return ct_err_set(err, -ENOENT, "Domain not found: no domain with matching name '%s'", dom);
    }
    if (disk) {
        *k = m_disk_find(*d, disk);
        if (!*k) {
            return ct_err_set(err, -ENOENT, "domain %s has no disk '%s'", dom, disk);
        }
    }
    if (flags & MGR_LIVE_DONE) {
        /* The daemon's job already changed the files: the catalog describes them as they were
         * when it started. Read them without locks; the daemon has them open. */
        x->live_checked = true;
        return live_ctx_enter(x, *d, err);
    }
    return ctx_verify_domain(x, *d, err);
}

/* End of a block job's planning: run it offline, start it in the daemon, or (MGR_LIVE_DONE)
 * record what the daemon's job did. */
static int block_finish(struct m_ctx *x, struct m_domain *d, struct m_disk *k, enum live_job_op op,
                        const struct mgr_block_opts *o, unsigned flags, struct mgr_plan **plan_out,
                        struct ct_err *err)
{
    if (flags & MGR_LIVE_DONE) {
        return live_job_done_finish(x, plan_out, err);
    }
    if (x->live && !(flags & MGR_DRY_RUN)) {
        return live_job_begin(x, d, k, op, o, err);
    }
    if (!x->live && o->keep_overlay) {
        return ct_err_set(err, -EINVAL,
                          "--keep-overlay needs a running domain; offline, a commit always "
                          "pivots to the base");
    }
    if (x->live) {
        x->live = false; /* a dry run shows the plan as the offline job would run it */
        m_probe_set_force_share(false);
        plan_note(x->plan, "the domain is running: the daemon would move the data live");
    }
    return ctx_finish(x, (flags & MGR_DRY_RUN) != 0, plan_out, err);
}

/* The disk's chain from the top down, as the catalog has it. */
static size_t chain_of(struct m_ctx *x, const char *top, char ***out)
{
    size_t n = 0;
    *out = NULL;
    for (const char *p = top; p && n < 4096;) {
        *out = mgr_xrealloc(*out, (n + 1) * sizeof(char *));
        (*out)[n++] = mgr_xstrdup(p);
        struct m_image *im = m_image_find(x->cat, p);
        p = im ? im->backing : NULL;
    }
    return n;
}

static ssize_t chain_index(char **chain, size_t n, const char *path, struct ct_err *err,
                           const char *what)
{
    char *abs = mgr_abspath(path);
    for (size_t i = 0; abs && i < n; i++) {
        if (strcmp(chain[i], abs) == 0) {
            free(abs);
            return (ssize_t)i;
        }
    }
    free(abs);
    return ct_err_set(err, -ENOENT, "%s '%s' is not in the disk's backing chain", what, path);
}

static bool in_set(char **v, size_t n, const char *s)
{
    for (size_t i = 0; s && i < n; i++) {
        if (strcmp(v[i], s) == 0) {
            return true;
        }
    }
    return false;
}

static void set_add(char ***v, size_t *n, const char *s)
{
    if (!in_set(*v, *n, s)) {
        *v = mgr_xrealloc(*v, (*n + 1) * sizeof(char *));
        (*v)[(*n)++] = mgr_xstrdup(s);
    }
}

/*
 * Snapshots whose data changes when the views of the images in V (closed under "backed by",
 * except the images in keep) change: list them, refuse protected ones and, unless force,
 * refuse at all; with force, mark them invalid. Images in V no snapshot accounts for (other
 * domains, other disks' tops) are refused always.
 */
static int invalidate(struct m_ctx *x, struct m_domain *d, char ***V, size_t *nv, char **keep,
                      size_t nkeep, bool force, const char *op, struct ct_err *err)
{
    for (bool grew = true; grew;) {
        grew = false;
        for (size_t i = 0; i < x->cat->ni; i++) {
            struct m_image *im = x->cat->imgs[i];
            if (im->backing && in_set(*V, *nv, im->backing) && !in_set(*V, *nv, im->path) &&
                !in_set(keep, nkeep, im->path)) {
                set_add(V, nv, im->path);
                grew = true;
            }
        }
    }
    struct sbuf names = {0};
    struct m_snap **hit = NULL;
    size_t nhit = 0;
    for (size_t i = 0; i < *nv; i++) {
        struct m_image *im = m_image_find(x->cat, (*V)[i]);
        if (im && im->domain && !mgr_streq(im->domain, d->name)) {
            sb_steal(&names);
            return ct_err_set(err, -CT_E_BUSY,
                              "%s would change '%s', an image of domain %s: refused", op, im->path,
                              im->domain);
        }
    }
    for (size_t j = 0; j < d->ns; j++) {
        struct m_snap *s = d->snaps[j];
        bool affected = false;
        for (size_t k = 0; k < s->nd; k++) {
            struct m_snapdisk *sd = &s->disks[k];
            if (sd->kind == MK_EXTERNAL && in_set(*V, *nv, sd->image)) {
                affected = true;
            }
            if (sd->kind == MK_INTERNAL) {
                struct m_image *h = m_image_find(x->cat, sd->image);
                if ((h && in_set(*V, *nv, h->backing)) || in_set(*V, *nv, sd->mat)) {
                    affected = true;
                }
            }
        }
        if (affected) {
            hit = mgr_xrealloc(hit, (nhit + 1) * sizeof(*hit));
            hit[nhit++] = s;
            sb_addf(&names, "%s%s", names.len ? ", " : "", s->name);
        }
    }
    char *list = sb_steal(&names);
    int r = 0;
    for (size_t i = 0; i < nhit && r == 0; i++) {
        if (hit[i]->protect) {
            r = ct_err_set(err, -CT_E_BUSY, "%s would change the data of protected snapshot %s", op,
                           hit[i]->name);
        }
    }
    if (r == 0 && nhit && !force) {
        r = ct_err_set(err, -CT_E_BUSY,
                       "%s would change the data of snapshot(s) %s; delete them first, or use "
                       "--force to mark them invalid",
                       op, list);
    }
    if (r == 0 && nhit) {
        for (size_t i = 0; i < nhit; i++) {
            hit[i]->valid = false;
        }
        d->dirty = true;
        plan_note(x->plan, "marks snapshot(s) %s invalid", list);
    }
    free(list);
    free(hit);
    return r;
}

int mgr_blockcommit(struct mgr *m, const char *dom, const char *disk,
                    const struct mgr_block_opts *o, unsigned flags, struct mgr_plan **plan_out,
                    struct ct_err *err)
{
    struct m_ctx x;
    ctx_init(&x, m);
    struct m_domain *d;
    struct m_disk *k;
    char **chain = NULL, **V = NULL, **keep = NULL;
    size_t n = 0, nv = 0, nkeep = 0;
    int r = load(&x, dom, disk, &d, &k, flags, err);
    if (r < 0) {
        goto out;
    }
    n = chain_of(&x, k->top, &chain);
    ssize_t ti = 0, bi = (ssize_t)n - 1;
    if (o->top) {
        ti = chain_index(chain, n, o->top, err, "top");
    }
    if (ti >= 0 && o->base && o->shallow) {
        ti = ct_err_set(err, -EINVAL, "--base and --shallow are mutually exclusive");
    }
    if (ti >= 0 && o->base) {
        bi = chain_index(chain, n, o->base, err, "base");
    } else if (ti >= 0 && o->shallow) {
        bi = ti + 1;
    }
    if (ti < 0 || bi < 0) {
        r = ti < 0 ? (int)ti : (int)bi;
        goto out;
    }
    if (bi <= ti || (size_t)bi >= n) {
        r = ct_err_set(err, -EINVAL, "nothing to commit: '%s' has no backing file below it%s",
                       chain[ti], o->base ? " down to the given base" : "");
        goto out;
    }
    const char *base = chain[bi];
    struct m_image *bim = m_image_find(x.cat, base);
    x.plan = plan_new("blockcommit", d->name);
    /* Views that change: the base and the layers between top and base, and what reads them,
     * except the chain from the top up (whose views stay what they are). */
    for (ssize_t i = ti + 1; i <= bi; i++) {
        set_add(&V, &nv, chain[i]);
    }
    for (ssize_t i = 0; i <= ti; i++) {
        set_add(&keep, &nkeep, chain[i]);
    }
    for (size_t i = 0; i < x.cat->ni; i++) {
        /* Overlays of the top are relinked to the base: their views stay too. */
        if (mgr_streq(x.cat->imgs[i]->backing, chain[ti])) {
            set_add(&keep, &nkeep, x.cat->imgs[i]->path);
        }
    }
    r = invalidate(&x, d, &V, &nv, keep, nkeep, o->force, "blockcommit", err);
    if (r < 0) {
        goto out;
    }
    /* Internal snapshots held by the committed top read through the changed chain too. */
    for (size_t j = 0; j < d->ns && r == 0; j++) {
        for (size_t q = 0; q < d->snaps[j]->nd; q++) {
            struct m_snapdisk *sd = &d->snaps[j]->disks[q];
            if (sd->kind == MK_INTERNAL && mgr_streq(sd->image, chain[ti]) && d->snaps[j]->valid) {
                if (d->snaps[j]->protect || !o->force) {
                    r = ct_err_set(err, -CT_E_BUSY,
                                   "blockcommit would change the data of %ssnapshot %s (held in "
                                   "'%s')%s",
                                   d->snaps[j]->protect ? "protected " : "", d->snaps[j]->name,
                                   chain[ti],
                                   d->snaps[j]->protect ? ""
                                                        : "; use --force to "
                                                          "mark it invalid");
                    break;
                }
                d->snaps[j]->valid = false;
                d->dirty = true;
            }
        }
    }
    if (r < 0) {
        goto out;
    }
    for (ssize_t i = bi - 1; i >= ti; i--) {
        struct m_image *li = m_image_find(x.cat, chain[i]);
        struct m_probe *lp = m_probe_get(&x.probes, chain[i], li->format, err);
        if (!lp) {
            r = err ? err->code : -EIO;
            goto out;
        }
        plan_add(x.plan, ST_COMMIT, chain[i], base, bim->format, li->format, NULL, 0, lp->alloc);
    }
    for (size_t i = 0; i < x.cat->ni; i++) {
        struct m_image *g = x.cat->imgs[i];
        if (mgr_streq(g->backing, chain[ti])) {
            plan_add(x.plan, ST_REBASE, g->path, base, bim->format, chain[ti], g->backing_fmt, 0,
                     0);
            mgr_setstr(&g->backing, base);
            mgr_setstr(&g->backing_fmt, bim->format);
            x.cat->images_dirty = true;
        }
    }
    if (ti == 0) {
        mgr_setstr(&k->top, base);
        mgr_setstr(&k->format, bim->format);
        bim->owned = true;
        mgr_setstr(&bim->domain, d->name);
        mgr_setstr(&bim->target, k->target);
        x.cat->images_dirty = true;
        d->dirty = true;
    }
    for (ssize_t i = ti; i < bi; i++) {
        const char *l = chain[i];
        struct m_probe *lp = m_probe_get(&x.probes, l, NULL, NULL);
        bool used =
            m_named_by_snapshot(x.cat, l) || m_children(x.cat, l, NULL) || (lp && lp->nsnaps);
        if (used) {
            plan_note(x.plan, "kept %s: still used by a snapshot or another image", l);
            continue;
        }
        if (o->delete_layers) {
            struct m_image *li = m_image_find(x.cat, l);
            if (li && li->owned) {
                plan_add(x.plan, ST_REMOVE, l, NULL, NULL, NULL, NULL, 0, 0);
            } else {
                plan_note(x.plan, "kept %s: not an image cowtree made", l);
            }
        }
        m_image_remove(x.cat, l);
        m_retarget(x.cat, l, NULL); /* snapshot overlay names that named it */
    }
    m_forget_unused_unowned(x.cat);
    r = block_finish(&x, d, k, LJ_COMMIT, o, flags, plan_out, err);
out:
    mgr_strv_free(chain, n);
    mgr_strv_free(V, nv);
    mgr_strv_free(keep, nkeep);
    ctx_fini(&x);
    return r;
}

int mgr_blockpull(struct mgr *m, const char *dom, const char *disk, const struct mgr_block_opts *o,
                  unsigned flags, struct mgr_plan **plan_out, struct ct_err *err)
{
    struct m_ctx x;
    ctx_init(&x, m);
    struct m_domain *d;
    struct m_disk *k;
    char **chain = NULL;
    size_t n = 0;
    int r = load(&x, dom, disk, &d, &k, flags, err);
    if (r < 0) {
        goto out;
    }
    n = chain_of(&x, k->top, &chain);
    ssize_t bi = (ssize_t)n;
    if (o->base) {
        bi = chain_index(chain, n, o->base, err, "base");
        if (bi == 0) {
            bi = ct_err_set(err, -EINVAL, "the base cannot be the disk's active image");
        }
        if (bi < 0) {
            r = (int)bi;
            goto out;
        }
    }
    x.plan = plan_new("blockpull", d->name);
    if (bi <= 1) {
        plan_note(x.plan, "nothing to pull: the base is already the backing file");
        r = ctx_finish(&x, (flags & MGR_DRY_RUN) != 0, plan_out, err);
        goto out;
    }
    struct m_image *top = m_image_find(x.cat, chain[0]);
    struct m_probe *tp = m_probe_get(&x.probes, chain[0], top->format, err);
    if (!tp) {
        r = err ? err->code : -EIO;
        goto out;
    }
    for (size_t j = 0; j < d->ns && r == 0; j++) {
        for (size_t q = 0; q < d->snaps[j]->nd; q++) {
            struct m_snapdisk *sd = &d->snaps[j]->disks[q];
            if (sd->kind == MK_INTERNAL && mgr_streq(sd->image, chain[0]) && d->snaps[j]->valid) {
                if (d->snaps[j]->protect || !o->force) {
                    r = ct_err_set(err, -CT_E_BUSY,
                                   "blockpull would change the data of %ssnapshot %s (an "
                                   "internal snapshot of '%s' reads through its backing "
                                   "files)%s",
                                   d->snaps[j]->protect ? "protected " : "", d->snaps[j]->name,
                                   chain[0],
                                   d->snaps[j]->protect ? ""
                                                        : "; use --force to mark "
                                                          "it invalid");
                    break;
                }
                d->snaps[j]->valid = false;
                d->dirty = true;
            }
        }
    }
    if (r == 0 && tp->nsnaps && !o->force) {
        r = ct_err_set(err, -CT_E_BUSY,
                       "'%s' holds internal snapshots that read through its backing files; "
                       "blockpull would change them (use --force)",
                       chain[0]);
    }
    if (r < 0) {
        goto out;
    }
    uint64_t bytes = 0;
    for (ssize_t i = 1; i < bi; i++) {
        struct m_probe *lp = m_probe_get(&x.probes, chain[i], NULL, NULL);
        bytes += lp ? lp->alloc : 0;
    }
    const char *nb = (size_t)bi < n ? chain[bi] : NULL;
    const char *nbf = nb ? m_image_find(x.cat, nb)->format : NULL;
    plan_add(x.plan, ST_PULL, chain[0], nb, nbf, top->format, NULL, 0, bytes);
    char *old = mgr_xstrdup(top->backing);
    mgr_setstr(&top->backing, nb);
    mgr_setstr(&top->backing_fmt, nbf);
    x.cat->images_dirty = true;
    r = ctx_collapse(&x, old, false, err);
    free(old);
    m_forget_unused_unowned(x.cat);
    if (r == 0) {
        r = block_finish(&x, d, k, LJ_PULL, o, flags, plan_out, err);
    }
out:
    mgr_strv_free(chain, n);
    ctx_fini(&x);
    return r;
}

int mgr_blockcopy(struct mgr *m, const char *dom, const char *disk, const struct mgr_block_opts *o,
                  unsigned flags, struct mgr_plan **plan_out, struct ct_err *err)
{
    struct m_ctx x;
    ctx_init(&x, m);
    struct m_domain *d;
    struct m_disk *k;
    char **chain = NULL;
    size_t n = 0;
    char *dest = NULL;
    int r = load(&x, dom, disk, &d, &k, flags, err);
    if (r < 0) {
        goto out;
    }
    const char *fmt = o->format ? o->format : "qcow2";
    if (strcmp(fmt, "qcow2") != 0 && strcmp(fmt, "raw") != 0) {
        r = ct_err_set(err, -EINVAL, "--format must be raw or qcow2");
        goto out;
    }
    n = chain_of(&x, k->top, &chain);
    struct m_image *top = m_image_find(x.cat, k->top);
    const char *backing = o->shallow ? top->backing : NULL;
    if (backing && strcmp(fmt, "raw") == 0) {
        r = ct_err_set(err, -EINVAL, "a shallow copy needs a qcow2 destination");
        goto out;
    }
    dest = mgr_abspath(o->dest);
    if (!dest) {
        r = ct_err_set(err, -ENOENT, "invalid destination '%s'", o->dest);
        goto out;
    }
    if (m_image_find(x.cat, dest)) {
        r = ct_err_set(err, -EEXIST, "'%s' is already an image of a domain", dest);
        goto out;
    }
    if (o->reuse_external) {
        struct m_probe *dp = m_probe_get(&x.probes, dest, fmt, err);
        if (!mgr_file_exists(dest)) {
            r = ct_err_set(err, -ENOENT, "'%s' does not exist (--reuse-external needs it)", dest);
        } else if (!dp) {
            r = err ? err->code : -EIO;
        } else if (!mgr_streq(dp->backing, backing)) {
            r = ct_err_set(err, -EINVAL, "'%s' has backing file %s, the copy needs %s", dest,
                           dp->backing ? dp->backing : "(none)", backing ? backing : "(none)");
        } else if (dp->size < m_probe_get(&x.probes, k->top, k->format, NULL)->size) {
            r = ct_err_set(err, -EINVAL, "'%s' is smaller than the disk", dest);
        }
    } else if (mgr_file_exists(dest) && !(flags & MGR_LIVE_DONE)) {
        r = ct_err_set(err, -EEXIST, "'%s' already exists (use --reuse-external)", dest);
    }
    if (r < 0) {
        goto out;
    }
    uint64_t bytes = 0;
    for (size_t i = 0; i < (o->shallow ? 1 : n); i++) {
        struct m_probe *lp = m_probe_get(&x.probes, chain[i], NULL, NULL);
        bytes += lp ? lp->alloc : 0;
    }
    x.plan = plan_new("blockcopy", d->name);
    plan_add(x.plan, ST_COPY, k->top, dest, fmt, backing, backing ? top->format : NULL,
             o->reuse_external ? 1 : 0, bytes);
    ctx_note_created(&x, dest);
    if (o->pivot) {
        m_image_add(x.cat, dest, d->name, k->target, fmt, backing,
                    backing ? top->backing_fmt : NULL, true);
        char *old = mgr_xstrdup(k->top);
        mgr_setstr(&k->top, dest);
        mgr_setstr(&k->format, fmt);
        d->dirty = true;
        r = ctx_collapse(&x, old, false, err);
        free(old);
        m_forget_unused_unowned(x.cat);
    }
    if (r == 0) {
        r = block_finish(&x, d, k, LJ_COPY, o, flags, plan_out, err);
    }
out:
    free(dest);
    mgr_strv_free(chain, n);
    ctx_fini(&x);
    return r;
}

int mgr_clone(struct mgr *m, const char *dom, const char *snap, const char *newdom, bool flatten,
              unsigned flags, struct mgr_plan **plan_out, struct ct_err *err)
{
    struct m_ctx x;
    ctx_init(&x, m);
    struct m_domain *d = NULL;
    struct m_disk *unused;
    int r = mgr_check_name("domain", newdom, err);
    if (r == 0) {
        r = load(&x, dom, NULL, &d, &unused, 0, err);
    }
    struct m_snap *s = r == 0 ? m_snap_find(d, snap) : NULL;
    if (r == 0 && !s) {
        r = ct_err_set(err, -ENOENT,
                       "Domain snapshot not found: no domain snapshot with matching name '%s'",
                       snap);
    }
    if (r == 0 && m_domain_find(x.cat, newdom)) {
        r = ct_err_set(err, -EEXIST, "domain '%s' already exists", newdom);
    }
    if (r == 0 && !s->valid) {
        r = ct_err_set(err, -CT_E_BUSY, "snapshot %s is invalid", snap);
    }
    if (r < 0) {
        goto out;
    }
    x.plan = plan_new("clone", newdom);
    struct m_domain *nd = mgr_xcalloc(1, sizeof(*nd));
    char uuid[37];
    r = mgr_uuid_generate(uuid);
    nd->name = mgr_xstrdup(newdom);
    nd->uuid = mgr_xstrdup(uuid);
    nd->type = mgr_xstrdup(d->type);
    nd->origin = mgr_xasprintf("%s/%s", d->name, s->name);
    nd->created = (int64_t)time(NULL);
    nd->dirty = true;
    x.cat->doms = mgr_xrealloc(x.cat->doms, (x.cat->nd + 1) * sizeof(*x.cat->doms));
    x.cat->doms[x.cat->nd++] = nd;
    for (size_t i = 0; i < d->nd && r == 0; i++) {
        struct m_snapdisk *sd = m_snapdisk_find(s, d->disks[i].target);
        if (!sd || sd->kind == MK_NO) {
            r = ct_err_set(err, -EINVAL, "snapshot %s does not capture disk %s: cannot clone it",
                           s->name, d->disks[i].target);
            break;
        }
        if (sd->kind == MK_INTERNAL && (!sd->mat || !m_image_find(x.cat, sd->mat))) {
            r = ctx_materialize(&x, d, s, sd, err);
            if (r < 0) {
                break;
            }
        }
        const char *state = sd->kind == MK_EXTERNAL ? sd->image : sd->mat;
        struct m_image *sim = m_image_find(x.cat, state);
        char *dir = mgr_dirname(state);
        char *stem = mgr_xasprintf("%s-%s", newdom, d->disks[i].target);
        char *path = ctx_free_name(&x, dir, stem, ".qcow2");
        struct m_probe *sp = m_probe_get(&x.probes, state, sim->format, NULL);
        if (flatten) {
            plan_add(x.plan, ST_COPY, state, path, "qcow2", NULL, NULL, 0, sp ? sp->alloc : 0);
            m_image_add(x.cat, path, newdom, d->disks[i].target, "qcow2", NULL, NULL, true);
        } else {
            plan_add(x.plan, ST_CREATE_OVERLAY, path, state, sim->format, NULL, NULL, 0, 0);
            m_image_add(x.cat, path, newdom, d->disks[i].target, "qcow2", state, sim->format, true);
        }
        ctx_note_created(&x, path);
        nd->disks = mgr_xrealloc(nd->disks, (nd->nd + 1) * sizeof(*nd->disks));
        struct m_disk *k = &nd->disks[nd->nd++];
        k->target = mgr_xstrdup(d->disks[i].target);
        k->top = mgr_xstrdup(path);
        k->format = mgr_xstrdup("qcow2");
        free(dir);
        free(stem);
        free(path);
    }
    if (r == 0) {
        r = ctx_finish(&x, (flags & MGR_DRY_RUN) != 0, plan_out, err);
    }
out:
    ctx_fini(&x);
    return r;
}

/* ---- reconcile ---- */

void mgr_findings_free(struct mgr_finding *f, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free(f[i].path);
        free(f[i].what);
    }
    free(f);
}

struct findings {
    struct mgr_finding *v;
    size_t n;
};

static struct mgr_finding *finding(struct findings *f, const char *path, bool fixable,
                                   const char *fmt, ...) __attribute__((format(printf, 4, 5)));

static struct mgr_finding *finding(struct findings *f, const char *path, bool fixable,
                                   const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *s = NULL;
    if (vasprintf(&s, fmt, ap) < 0) {
        abort();
    }
    va_end(ap);
    f->v = mgr_xrealloc(f->v, (f->n + 1) * sizeof(*f->v));
    struct mgr_finding *e = &f->v[f->n++];
    e->path = mgr_xstrdup(path);
    e->what = s;
    e->fixable = fixable;
    e->fixed = false;
    e->note = false;
    return e;
}

static void check_image(struct m_ctx *x, struct m_domain *d, const char *path, char ***seen,
                        size_t *nseen, struct findings *f, bool referenced)
{
    for (size_t guard = 0; path && guard < 4096; guard++) {
        if (in_set(*seen, *nseen, path)) {
            return;
        }
        set_add(seen, nseen, path);
        struct m_image *im = m_image_find(x->cat, path);
        if (!im) {
            finding(f, path, false, "the catalog has no record of this image");
            return;
        }
        if (!mgr_file_exists(path)) {
            finding(f, path, false,
                    "the file is missing (moved or deleted behind cowtree's "
                    "back)");
            return;
        }
        struct ct_err e2 = {0};
        struct m_probe *pr = m_probe_get(&x->probes, path, im->format, &e2);
        if (!pr) {
            finding(f, path, false, "cannot be read as %s: %s", im->format, e2.msg);
            return;
        }
        if (!mgr_streq(pr->backing, im->backing)) {
            finding(f, path, false, "links to backing file %s, the catalog expects %s",
                    pr->backing ? pr->backing : "(none)", im->backing ? im->backing : "(none)");
        }
        path = im->backing;
    }
}

int mgr_reconcile(struct mgr *m, const char *dom, bool fix, struct mgr_finding **out, size_t *n,
                  struct ct_err *err)
{
    *out = NULL;
    *n = 0;
    struct m_ctx x;
    ctx_init(&x, m);
    int r = cat_load(m, &x.cat, err);
    struct m_domain *d = r == 0 ? m_domain_find(x.cat, dom) : NULL;
    if (r == 0 && !d) {
        r = ct_err_set(err, -ENOENT, "Domain not found: no domain with matching name '%s'", dom);
    }
    bool running = false;
    if (r == 0) {
        r = live_domain_running(m, d, &running, err);
    }
    if (r == 0 && running) {
        /* The daemon has the files open: read them without locks. */
        x.live_checked = true;
        r = live_ctx_enter(&x, d, err);
    }
    if (r < 0) {
        ctx_fini(&x);
        return r;
    }
    struct findings f = {0};
    char **seen = NULL;
    size_t nseen = 0;
    for (size_t i = 0; i < d->nd; i++) {
        check_image(&x, d, d->disks[i].top, &seen, &nseen, &f, true);
    }
    bool changed = false;
    for (size_t i = 0; i < d->ns; i++) {
        struct m_snap *s = d->snaps[i];
        for (size_t j = 0; j < s->nd; j++) {
            struct m_snapdisk *sd = &s->disks[j];
            if (sd->kind == MK_NO) {
                continue;
            }
            check_image(&x, d, sd->image, &seen, &nseen, &f, true);
            if (sd->mat) {
                check_image(&x, d, sd->mat, &seen, &nseen, &f, true);
            }
            if (sd->kind == MK_INTERNAL && mgr_file_exists(sd->image)) {
                struct m_probe *pr = m_probe_get(&x.probes, sd->image, NULL, NULL);
                if (pr && !m_probe_has_snap(pr, s->name) && s->valid) {
                    struct mgr_finding *e =
                        finding(&f, sd->image, true,
                                "holds no internal snapshot '%s' (snapshot %s, disk %s)%s", s->name,
                                s->name, sd->target, fix ? "; marked invalid" : "");
                    if (fix) {
                        s->valid = false;
                        e->fixed = changed = true;
                    }
                }
            }
            if (sd->kind == MK_EXTERNAL && sd->file && !mgr_file_exists(sd->file) &&
                !m_image_find(x.cat, sd->file)) {
                struct mgr_finding *e =
                    finding(&f, sd->file, true, "overlay of snapshot %s no longer exists%s",
                            s->name, fix ? "; reference dropped" : "");
                if (fix) {
                    mgr_setstr(&sd->file, NULL);
                    e->fixed = changed = true;
                }
            }
        }
    }
    /* Internal snapshots the files hold that no catalog snapshot names. */
    for (size_t i = 0; i < nseen; i++) {
        struct m_probe *pr =
            mgr_file_exists(seen[i]) ? m_probe_get(&x.probes, seen[i], NULL, NULL) : NULL;
        for (size_t k = 0; pr && k < pr->nsnaps; k++) {
            bool known = false;
            for (size_t j = 0; j < d->ns && !known; j++) {
                struct m_snap *s = d->snaps[j];
                for (size_t q = 0; q < s->nd; q++) {
                    known |= s->disks[q].kind == MK_INTERNAL &&
                             mgr_streq(s->disks[q].image, seen[i]) &&
                             strcmp(s->name, pr->snaps[k]) == 0;
                }
            }
            if (!known) {
                finding(&f, seen[i], false,
                        "holds internal snapshot '%s' that the catalog does not know "
                        "(--no-metadata, or made by another tool)",
                        pr->snaps[k])
                    ->note = true;
            }
        }
    }
    /* Catalog rows of this domain that nothing reaches. */
    for (size_t i = 0; i < x.cat->ni; i++) {
        struct m_image *im = x.cat->imgs[i];
        if (mgr_streq(im->domain, d->name) && !in_set(seen, nseen, im->path) &&
            !m_children(x.cat, im->path, NULL)) {
            bool gone = !mgr_file_exists(im->path);
            struct m_probe *pr = gone ? NULL : m_probe_get(&x.probes, im->path, im->format, NULL);
            if (pr && pr->nsnaps) {
                continue; /* kept for internal snapshots the catalog does not name */
            }
            struct mgr_finding *e =
                finding(&f, im->path, gone, "registered but used by nothing%s%s",
                        gone ? " and missing" : "", gone && fix ? "; record dropped" : "");
            if (gone && fix) {
                e->fixed = changed = true;
                m_image_remove(x.cat, im->path);
                i--;
            }
        }
    }
    mgr_strv_free(seen, nseen);
    if (changed) {
        d->dirty = true;
        r = ctx_finish(&x, false, NULL, err);
    }
    ctx_fini(&x);
    if (r < 0) {
        mgr_findings_free(f.v, f.n);
        return r;
    }
    *out = f.v;
    *n = f.n;
    return 0;
}
