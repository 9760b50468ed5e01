/*
 * What the image files say: format, size, backing link, internal snapshots, and how many
 * bytes a layer allocates (the cost of merging it). Planning reads each file once and then
 * keeps the cached entry in step with the plan (snapshots created or deleted, files created
 * or merged), so later decisions in the same plan see the files as they will be.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "manager/manager-int.h"
#include "util/err.h"

/* A failed read of a live image: only the allocation map could not be had (m_read_image). */
#define CT_E_MAP_LIVE 20001

/* Free what a probe holds and zero it. */
static void probe_reset(struct m_probe *p)
{
    free(p->path);
    free(p->format);
    for (size_t i = 0; i < p->nsnaps; i++) {
        free(p->snaps[i]);
    }
    free(p->snaps);
    free(p->backing);
    free(p->backing_fmt);
    memset(p, 0, sizeof(*p));
}

static void probe_free(struct m_probe *p)
{
    if (!p) {
        return;
    }
    probe_reset(p);
    free(p);
}

void m_probes_free(struct m_probes *p)
{
    for (size_t i = 0; i < p->n; i++) {
        probe_free(p->v[i]);
    }
    free(p->v);
    p->v = NULL;
    p->n = 0;
}

/* Resolve a backing name as stored in image path to an absolute path. */
static char *resolve_backing(const char *image, const char *name)
{
    if (!name || !*name) {
        return NULL;
    }
    if (name[0] == '/') {
        return mgr_abspath(name);
    }
    char *dir = mgr_dirname(image);
    char *joined = mgr_xasprintf("%s/%s", dir, name);
    char *abs = mgr_abspath(joined);
    free(dir);
    free(joined);
    return abs;
}

static bool force_share;

void m_probe_set_force_share(bool on)
{
    force_share = on;
}

static int read_image_once(const char *path, const char *fmt, struct m_probe *out,
                           struct ct_err *err);

/* An image the daemon is writing (force-share) can be read in a state no single instant had:
 * its tables change under a reader that opened it a moment before, and a data cluster may sit
 * where the reader still expects metadata. Such a read is tried again from a fresh open; if it
 * keeps failing only on the allocation map, the map is estimated as fully allocated (it only
 * sizes plans), not reported as a disagreement. */
int m_read_image(const char *path, const char *fmt, struct m_probe *out, struct ct_err *err)
{
    int r = read_image_once(path, fmt, out, err);
    for (int tries = 0; r < 0 && force_share && tries < 4; tries++) {
        probe_reset(out);
        r = read_image_once(path, fmt, out, err);
    }
    if (r < 0 && r != -CT_E_MAP_LIVE) {
        probe_reset(out);
    }
    if (r == -CT_E_MAP_LIVE) {
        out->alloc = out->size;
        r = 0;
    }
    return r;
}

static int read_image_once(const char *path, const char *fmt, struct m_probe *out,
                           struct ct_err *err)
{
    memset(out, 0, sizeof(*out));
    struct ct_image *img = NULL;
    struct ct_open_opts o = {.format = fmt,
                             .flags = CT_OPEN_NO_BACKING | (force_share ? CT_OPEN_FORCE_SHARE : 0)};
    int r = ct_image_open(&img, path, &o, err);
    if (r < 0) {
        return r;
    }
    struct ct_image_info info;
    r = ct_image_info(img, &info);
    if (r < 0) {
        ct_image_close(img, NULL);
        return ct_err_set(err, r, "%s: cannot read image information: %s", path, ct_strerror(r));
    }
    out->path = mgr_xstrdup(path);
    out->format = mgr_xstrdup(info.format);
    out->size = info.virtual_size;
    out->backing = resolve_backing(path, info.backing_file);
    if (info.backing_file && !out->backing) {
        /* A link that names nothing reachable: keep the name so the mismatch is reported. */
        out->backing = mgr_xstrdup(info.backing_file);
    }
    out->backing_fmt = mgr_xstrdup(info.backing_format);
    int ns = ct_snapshot_count(img);
    for (int i = 0; i < ns; i++) {
        struct ct_snapshot_info si;
        if (ct_snapshot_get(img, (unsigned)i, &si) == 0) {
            m_probe_add_snap(out, si.name);
        }
    }
    uint64_t off = 0;
    while (off < out->size) {
        struct ct_extent e;
        r = ct_image_block_status(img, off, out->size - off, &e);
        if (r < 0 || e.len == 0) {
            r = r < 0 ? r : -EIO;
            ct_err_set(err, r, "%s: cannot read the allocation map: %s", path, ct_strerror(r));
            if (force_share) {
                r = -CT_E_MAP_LIVE; /* the rest of the probe is good */
            }
            break;
        }
        if (e.flags & CT_STATUS_ALLOCATED) {
            out->alloc += e.len;
        }
        off += e.len;
        r = 0;
    }
    ct_image_close(img, NULL);
    return r;
}

struct m_probe *m_probe_get(struct m_probes *p, const char *path, const char *fmt,
                            struct ct_err *err)
{
    for (size_t i = 0; i < p->n; i++) {
        if (strcmp(p->v[i]->path, path) == 0) {
            if (p->v[i]->err) {
                ct_err_set(err, p->v[i]->err, "%s: cannot open: %s", path,
                           ct_strerror(p->v[i]->err));
                return NULL;
            }
            return p->v[i];
        }
    }
    struct m_probe *pr = mgr_xcalloc(1, sizeof(*pr));
    int r = m_read_image(path, fmt, pr, err);
    if (r < 0) {
        probe_free(pr);
        return NULL;
    }
    p->v = mgr_xrealloc(p->v, (p->n + 1) * sizeof(*p->v));
    p->v[p->n++] = pr;
    return pr;
}

void m_probe_drop(struct m_probes *p, const char *path)
{
    for (size_t i = 0; i < p->n; i++) {
        if (strcmp(p->v[i]->path, path) == 0) {
            probe_free(p->v[i]);
            memmove(&p->v[i], &p->v[i + 1], (p->n - i - 1) * sizeof(*p->v));
            p->n--;
            return;
        }
    }
}

struct m_probe *m_probe_synth(struct m_probes *p, const char *path, const char *fmt, uint64_t size,
                              const char *backing, const char *backing_fmt)
{
    m_probe_drop(p, path);
    struct m_probe *pr = mgr_xcalloc(1, sizeof(*pr));
    pr->path = mgr_xstrdup(path);
    pr->format = mgr_xstrdup(fmt);
    pr->size = size;
    pr->backing = mgr_xstrdup(backing);
    pr->backing_fmt = mgr_xstrdup(backing ? backing_fmt : NULL);
    pr->synthetic = true;
    p->v = mgr_xrealloc(p->v, (p->n + 1) * sizeof(*p->v));
    p->v[p->n++] = pr;
    return pr;
}

bool m_probe_has_snap(const struct m_probe *pr, const char *name)
{
    for (size_t i = 0; i < pr->nsnaps; i++) {
        if (strcmp(pr->snaps[i], name) == 0) {
            return true;
        }
    }
    return false;
}

void m_probe_add_snap(struct m_probe *pr, const char *name)
{
    pr->snaps = mgr_xrealloc(pr->snaps, (pr->nsnaps + 1) * sizeof(*pr->snaps));
    pr->snaps[pr->nsnaps++] = mgr_xstrdup(name ? name : "");
}

void m_probe_del_snap(struct m_probe *pr, const char *name)
{
    for (size_t i = 0; i < pr->nsnaps; i++) {
        if (strcmp(pr->snaps[i], name) == 0) {
            free(pr->snaps[i]);
            memmove(&pr->snaps[i], &pr->snaps[i + 1], (pr->nsnaps - i - 1) * sizeof(char *));
            pr->nsnaps--;
            return;
        }
    }
}

static int diff_found(void *opaque, uint64_t off, uint64_t len)
{
    *(bool *)opaque = true;
    return -ECANCELED;
}

int m_probe_snap_differs(const char *path, const char *fmt, const char *name, bool *differs,
                         struct ct_err *err)
{
    struct ct_image *img = NULL;
    struct ct_open_opts o = {.format = fmt,
                             .flags = CT_OPEN_NO_BACKING | (force_share ? CT_OPEN_FORCE_SHARE : 0)};
    int r = ct_image_open(&img, path, &o, err);
    if (r < 0) {
        return r;
    }
    *differs = false;
    int idx = ct_snapshot_find(img, name, err);
    if (idx < 0) {
        ct_image_close(img, NULL);
        return idx;
    }
    struct ct_snapshot_info si;
    r = ct_snapshot_get(img, (unsigned)idx, &si);
    if (r == 0 && si.disk_size != ct_image_size(img)) {
        *differs = true;
    }
    if (r == 0 && !*differs) {
        r = ct_snapshot_diff(img, name, NULL, diff_found, differs, err);
        if (r == -ECANCELED && *differs) {
            r = 0;
        }
    }
    ct_image_close(img, NULL);
    return r;
}
