/*
 * Domains: open/close of the manager, define (from --disk arguments or a libvirt <domain>
 * document), undefine, and the read-only views the listing commands print.
 *
 * A disk's image and its backing chain are registered at define time: the top is owned (the
 * domain's writable disk, which cowtree may later merge or remove like any image it made);
 * the files below it are not (a template may be shared by other domains or tools), so cowtree
 * never writes or removes them unless a block job names them explicitly.
 */
#include <errno.h>
#include <libxml/parser.h>
#include <libxml/tree.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "manager/manager-int.h"
#include "util/err.h"

int mgr_open(struct mgr **out, const struct mgr_opts *opts, struct ct_err *err)
{
    *out = NULL;
    if (!opts || !opts->home || !*opts->home) {
        return ct_err_set(err, -EINVAL, "no catalog directory given");
    }
    struct mgr *m = mgr_xcalloc(1, sizeof(*m));
    m->home = mgr_xstrdup(opts->home);
    m->opts = *opts;
    m->opts.home = m->home;
    m->opts.daemon = mgr_xstrdup(opts->daemon);
    m->lock_fd = -1;
    int r = cat_open(m, err);
    if (r == 0 && !opts->no_recover) {
        r = journal_recover(m, NULL, err);
    }
    if (r == 0 && !opts->no_recover) {
        r = live_jobs_sync(m, err);
    }
    if (r < 0) {
        mgr_close(m);
        return r;
    }
    *out = m;
    return 0;
}

void mgr_close(struct mgr *m)
{
    if (!m) {
        return;
    }
    live_close(m);
    cat_close(m);
    free((char *)m->opts.daemon);
    free(m->home);
    free(m);
}

void mgr_set_speed(struct mgr *m, uint64_t bytes_per_sec)
{
    m->opts.speed = bytes_per_sec;
}

int mgr_recover(struct mgr *m, unsigned *nplans, struct ct_err *err)
{
    return journal_recover(m, nplans, err);
}

void mgr_strv_free(char **v, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free(v[i]);
    }
    free(v);
}

const char *mgr_kind_name(int kind)
{
    return kind == MGR_KIND_INTERNAL ? "internal" : kind == MGR_KIND_EXTERNAL ? "external" : "no";
}

/* ---- define ---- */

int dom_register_chain(struct m_ctx *x, const char *domain, const char *target, const char *top,
                       const char *fmt, bool owned_top, struct ct_err *err)
{
    struct ct_image *img;
    struct ct_open_opts o = {.format = fmt, .flags = 0};
    int r = ct_image_open(&img, top, &o, err);
    if (r < 0) {
        return r;
    }
    for (struct ct_image *l = img; l && r == 0; l = ct_image_backing(l)) {
        char *path = mgr_abspath(ct_image_filename(l));
        struct ct_image *b = ct_image_backing(l);
        char *bpath = b ? mgr_abspath(ct_image_filename(b)) : NULL;
        if (!path || (b && !bpath)) {
            r = ct_err_set(err, -errno, "cannot resolve '%s'", ct_image_filename(l));
        }
        struct m_image *known = r == 0 ? m_image_find(x->cat, path) : NULL;
        bool is_top = l == img;
        if (r == 0 && known) {
            if (is_top || known->owned) {
                r = ct_err_set(err, -EEXIST, "'%s' is already used by domain %s%s%s", path,
                               known->domain ? known->domain : "(shared)",
                               known->target ? " disk " : "", known->target ? known->target : "");
            } else if (!mgr_streq(known->backing, bpath)) {
                r = ct_err_set(err, -CT_E_CORRUPT,
                               "'%s' is registered with backing file '%s' but links to '%s'", path,
                               known->backing ? known->backing : "(none)",
                               bpath ? bpath : "(none)");
            } else if (!mgr_streq(known->domain, domain)) {
                /* A base shared by several domains belongs to none of them. */
                mgr_setstr(&known->domain, NULL);
                mgr_setstr(&known->target, NULL);
                x->cat->images_dirty = true;
            }
        } else if (r == 0) {
            m_image_add(x->cat, path, domain, target, ct_image_format(l), bpath,
                        b ? ct_image_format(b) : NULL, is_top && owned_top);
        }
        free(path);
        free(bpath);
    }
    ct_image_close(img, NULL);
    return r;
}

static int valid_target(const char *t, struct ct_err *err)
{
    if (!t || !*t || strlen(t) > 64) {
        return ct_err_set(err, -EINVAL, "invalid disk target '%s'", t ? t : "");
    }
    for (const char *p = t; *p; p++) {
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
              *p == '_' || *p == '-' || *p == '.')) {
            return ct_err_set(err, -EINVAL, "invalid disk target '%s'", t);
        }
    }
    return 0;
}

static int define_common(struct mgr *m, const char *name, const char *uuid, const char *type,
                         const char *xml, const struct mgr_disk_arg *disks, size_t n,
                         struct ct_err *err)
{
    int r = mgr_check_name("domain", name, err);
    if (r < 0) {
        return r;
    }
    if (n == 0) {
        return ct_err_set(err, -EINVAL, "domain %s has no disk (use --disk TARGET=PATH)", name);
    }
    for (size_t i = 0; i < n; i++) {
        r = valid_target(disks[i].target, err);
        if (r < 0) {
            return r;
        }
        for (size_t j = 0; j < i; j++) {
            if (strcmp(disks[i].target, disks[j].target) == 0) {
                return ct_err_set(err, -EEXIST, "disk target %s is given twice", disks[i].target);
            }
        }
        if (!disks[i].path || !*disks[i].path) {
            return ct_err_set(err, -EINVAL, "disk %s has no source file", disks[i].target);
        }
    }
    struct m_ctx x;
    ctx_init(&x, m);
    r = cat_load(m, &x.cat, err);
    if (r < 0) {
        ctx_fini(&x);
        return r;
    }
    if (m_domain_find(x.cat, name)) {
        ctx_fini(&x);
        return ct_err_set(err, -EEXIST, "domain '%s' already exists", name);
    }
    char uuidbuf[37];
    if (uuid) {
        if (!mgr_uuid_valid(uuid)) {
            ctx_fini(&x);
            return ct_err_set(err, -EINVAL, "invalid UUID '%s'", uuid);
        }
        for (size_t i = 0; i < x.cat->nd; i++) {
            if (strcasecmp(x.cat->doms[i]->uuid, uuid) == 0) {
                r = ct_err_set(err, -EEXIST, "domain %s already has UUID %s", x.cat->doms[i]->name,
                               uuid);
                ctx_fini(&x);
                return r;
            }
        }
    } else {
        r = mgr_uuid_generate(uuidbuf);
        if (r < 0) {
            ctx_fini(&x);
            return ct_err_set(err, r, "cannot generate a UUID");
        }
        uuid = uuidbuf;
    }
    struct m_domain *d = mgr_xcalloc(1, sizeof(*d));
    d->name = mgr_xstrdup(name);
    d->uuid = mgr_xstrdup(uuid);
    d->type = mgr_xstrdup(type ? type : "kvm");
    d->xml = mgr_xstrdup(xml);
    d->created = (int64_t)time(NULL);
    d->dirty = true;
    x.cat->doms = mgr_xrealloc(x.cat->doms, (x.cat->nd + 1) * sizeof(*x.cat->doms));
    x.cat->doms[x.cat->nd++] = d;
    for (size_t i = 0; i < n && r == 0; i++) {
        char *abs = mgr_abspath(disks[i].path);
        if (!abs || !mgr_file_exists(abs)) {
            r = ct_err_set(err, -ENOENT, "disk %s: '%s' does not exist", disks[i].target,
                           disks[i].path);
            free(abs);
            break;
        }
        struct ct_image *img;
        struct ct_open_opts o = {.format = disks[i].format, .flags = CT_OPEN_NO_BACKING};
        r = ct_image_open(&img, abs, &o, err);
        if (r < 0) {
            ct_err_prefix(err, "disk %s: ", disks[i].target);
            free(abs);
            break;
        }
        char *fmt = mgr_xstrdup(ct_image_format(img));
        ct_image_close(img, NULL);
        r = dom_register_chain(&x, name, disks[i].target, abs, fmt, true, err);
        if (r < 0) {
            ct_err_prefix(err, "disk %s: ", disks[i].target);
        } else {
            d->disks = mgr_xrealloc(d->disks, (d->nd + 1) * sizeof(*d->disks));
            struct m_disk *k = &d->disks[d->nd++];
            k->target = mgr_xstrdup(disks[i].target);
            k->top = mgr_xstrdup(abs);
            k->format = fmt;
            fmt = NULL;
        }
        free(fmt);
        free(abs);
    }
    if (r == 0) {
        r = ctx_finish(&x, false, NULL, err);
    }
    ctx_fini(&x);
    return r;
}

int mgr_define(struct mgr *m, const char *name, const struct mgr_disk_arg *disks, size_t n,
               struct ct_err *err)
{
    return define_common(m, name, NULL, "kvm", NULL, disks, n, err);
}

static char *node_text(xmlNode *n)
{
    xmlChar *t = xmlNodeGetContent(n);
    char *s = mgr_xstrdup(t ? (const char *)t : "");
    xmlFree(t);
    return s;
}

static char *node_attr(xmlNode *n, const char *name)
{
    xmlChar *t = xmlGetProp(n, (const xmlChar *)name);
    char *s = t ? mgr_xstrdup((const char *)t) : NULL;
    xmlFree(t);
    return s;
}

static xmlNode *child(xmlNode *n, const char *name)
{
    for (xmlNode *c = n ? n->children : NULL; c; c = c->next) {
        if (c->type == XML_ELEMENT_NODE && strcmp((const char *)c->name, name) == 0) {
            return c;
        }
    }
    return NULL;
}

int mgr_define_xml(struct mgr *m, const char *xml, char **name_out, struct ct_err *err)
{
    *name_out = NULL;
    xmlDoc *doc = xmlReadMemory(xml, (int)strlen(xml), "domain.xml", NULL,
                                XML_PARSE_NONET | XML_PARSE_NOERROR | XML_PARSE_NOWARNING);
    if (!doc) {
        const xmlError *e = xmlGetLastError();
        return ct_err_set(err, -EINVAL, "invalid domain XML: %s",
                          e && e->message ? e->message : "parse error");
    }
    xmlNode *root = xmlDocGetRootElement(doc);
    int r = 0;
    struct mgr_disk_arg *disks = NULL;
    char **owned = NULL;
    size_t nd = 0, nowned = 0;
    char *name = NULL, *uuid = NULL, *type = NULL;
    if (!root || strcmp((const char *)root->name, "domain") != 0) {
        r = ct_err_set(err, -EINVAL, "expected a <domain> document");
        goto out;
    }
    xmlNode *nn = child(root, "name");
    if (!nn) {
        r = ct_err_set(err, -EINVAL, "the domain has no <name>");
        goto out;
    }
    name = node_text(nn);
    if (child(root, "uuid")) {
        uuid = node_text(child(root, "uuid"));
    }
    type = node_attr(root, "type");
    for (xmlNode *c = child(root, "devices") ? child(root, "devices")->children : NULL; c;
         c = c->next) {
        if (c->type != XML_ELEMENT_NODE || strcmp((const char *)c->name, "disk") != 0) {
            continue;
        }
        char *dtype = node_attr(c, "type"), *device = node_attr(c, "device");
        bool is_disk = !device || strcmp(device, "disk") == 0;
        bool is_file = !dtype || strcmp(dtype, "file") == 0;
        if (is_disk && !is_file) {
            r = ct_err_set(err, -CT_E_UNSUPPORTED,
                           "disk of type '%s' is not supported (only type='file')", dtype);
        }
        free(dtype);
        free(device);
        if (r < 0) {
            goto out;
        }
        if (!is_disk) {
            continue; /* cdrom, floppy, lun: kept in the XML, ignored */
        }
        char *src = child(c, "source") ? node_attr(child(c, "source"), "file") : NULL;
        char *tgt = child(c, "target") ? node_attr(child(c, "target"), "dev") : NULL;
        char *fmt = child(c, "driver") ? node_attr(child(c, "driver"), "type") : NULL;
        owned = mgr_xrealloc(owned, (nowned + 3) * sizeof(*owned));
        owned[nowned++] = src;
        owned[nowned++] = tgt;
        owned[nowned++] = fmt;
        if (!tgt) {
            r = ct_err_set(err, -EINVAL, "a disk has no <target dev=...>");
            goto out;
        }
        if (!src) {
            r = ct_err_set(err, -EINVAL, "disk %s has no <source file=...>", tgt);
            goto out;
        }
        disks = mgr_xrealloc(disks, (nd + 1) * sizeof(*disks));
        disks[nd++] = (struct mgr_disk_arg){.target = tgt, .path = src, .format = fmt};
    }
    r = define_common(m, name, uuid, type, xml, disks, nd, err);
    if (r == 0) {
        *name_out = name;
        name = NULL;
    }
out:
    free(name);
    free(uuid);
    free(type);
    free(disks);
    mgr_strv_free(owned, nowned);
    xmlFreeDoc(doc);
    return r;
}

/* ---- undefine ---- */

int mgr_undefine(struct mgr *m, const char *name, unsigned flags, struct ct_err *err)
{
    struct m_ctx x;
    ctx_init(&x, m);
    int r = cat_load(m, &x.cat, err);
    struct m_domain *d = r == 0 ? m_domain_find(x.cat, name) : NULL;
    if (r == 0 && !d) {
        r = ct_err_set(err, -ENOENT, "Domain not found: no domain with matching name '%s'", name);
    }
    bool running = false;
    if (r == 0) {
        r = live_domain_running(m, d, &running, err);
    }
    if (r == 0 && running) {
        r = ct_err_set(err, -CT_E_BUSY,
                       "cannot undefine domain %s while it is running (shut it down first)", name);
    }
    if (r == 0 && d->ns && !(flags & MGR_UNDEFINE_SNAPSHOTS)) {
        r = ct_err_set(err, -CT_E_BUSY,
                       "cannot undefine domain %s with %zu snapshot(s) (use "
                       "--snapshots-metadata to forget them; their files stay)",
                       name, d->ns);
    }
    for (size_t i = 0; r == 0 && i < x.cat->ni; i++) {
        struct m_image *im = x.cat->imgs[i];
        struct m_image *b = im->backing ? m_image_find(x.cat, im->backing) : NULL;
        if (b && mgr_streq(b->domain, name) && !mgr_streq(im->domain, name)) {
            r = ct_err_set(err, -CT_E_BUSY,
                           "cannot undefine domain %s: '%s' of domain %s is based on its image "
                           "'%s' (flatten or undefine that domain first)",
                           name, im->path, im->domain ? im->domain : "(shared)", b->path);
        }
    }
    if (r == 0) {
        x.plan = plan_new("undefine", name);
        d->removed = true;
        /* Drop the domain's images, then shared bases nothing uses any more. */
        for (size_t i = x.cat->ni; i-- > 0;) {
            struct m_image *im = x.cat->imgs[i];
            if (mgr_streq(im->domain, name)) {
                if ((flags & MGR_UNDEFINE_STORAGE) && im->owned) {
                    plan_add(x.plan, ST_REMOVE, im->path, NULL, NULL, NULL, NULL, 0, 0);
                }
                m_image_remove(x.cat, im->path);
            }
        }
        bool again = true;
        while (again) {
            again = false;
            for (size_t i = 0; i < x.cat->ni; i++) {
                struct m_image *im = x.cat->imgs[i];
                if (!im->domain && !m_children(x.cat, im->path, NULL) &&
                    !m_named_by_snapshot(x.cat, im->path)) {
                    m_image_remove(x.cat, im->path);
                    again = true;
                    break;
                }
            }
        }
        x.cat->images_dirty = true;
        r = ctx_finish(&x, false, NULL, err);
    }
    ctx_fini(&x);
    return r;
}

/* ---- views ---- */

int mgr_domain_names(struct mgr *m, char ***names, size_t *n, struct ct_err *err)
{
    struct m_cat *c;
    int r = cat_load(m, &c, err);
    if (r < 0) {
        return r;
    }
    *names = mgr_xcalloc(c->nd + 1, sizeof(char *));
    *n = c->nd;
    for (size_t i = 0; i < c->nd; i++) {
        (*names)[i] = mgr_xstrdup(c->doms[i]->name);
    }
    m_cat_free(c);
    return 0;
}

static size_t count_desc(const struct m_domain *d, const char *name)
{
    size_t n = 0;
    for (size_t i = 0; i < d->ns; i++) {
        if (mgr_streq(d->snaps[i]->parent, name)) {
            n += 1 + count_desc(d, d->snaps[i]->name);
        }
    }
    return n;
}

int mgr_domain_get(struct mgr *m, const char *name, struct mgr_domain_info **out,
                   struct ct_err *err)
{
    *out = NULL;
    struct m_cat *c;
    int r = cat_load(m, &c, err);
    if (r < 0) {
        return r;
    }
    struct m_domain *d = m_domain_find(c, name);
    if (!d) {
        m_cat_free(c);
        return ct_err_set(err, -ENOENT, "Domain not found: no domain with matching name '%s'",
                          name);
    }
    struct mgr_domain_info *o = mgr_xcalloc(1, sizeof(*o));
    o->name = mgr_xstrdup(d->name);
    o->uuid = mgr_xstrdup(d->uuid);
    o->type = mgr_xstrdup(d->type);
    o->current = mgr_xstrdup(d->current);
    o->origin = mgr_xstrdup(d->origin);
    o->created = d->created;
    r = live_fill_state(m, d, &o->run, err);
    if (r < 0) {
        free(o);
        m_cat_free(c);
        return r;
    }
    o->nd = d->nd;
    o->disks = mgr_xcalloc(d->nd, sizeof(*o->disks));
    for (size_t i = 0; i < d->nd; i++) {
        struct mgr_disk_info *k = &o->disks[i];
        k->target = mgr_xstrdup(d->disks[i].target);
        k->top = mgr_xstrdup(d->disks[i].top);
        k->format = mgr_xstrdup(d->disks[i].format);
        for (const char *p = k->top; p && k->nchain < 4096;) {
            k->chain = mgr_xrealloc(k->chain, (k->nchain + 1) * sizeof(char *));
            k->chain[k->nchain++] = mgr_xstrdup(p);
            struct m_image *im = m_image_find(c, p);
            p = im ? im->backing : NULL;
        }
    }
    o->ns = d->ns;
    o->snaps = mgr_xcalloc(d->ns, sizeof(*o->snaps));
    for (size_t i = 0; i < d->ns; i++) {
        const struct m_snap *s = d->snaps[i];
        struct mgr_snap_info *si = &o->snaps[i];
        si->name = mgr_xstrdup(s->name);
        si->desc = mgr_xstrdup(s->desc);
        si->state = mgr_xstrdup(s->state);
        si->parent = mgr_xstrdup(s->parent);
        si->ctime = s->ctime;
        si->current = mgr_streq(d->current, s->name);
        si->protect = s->protect || m_snap_has_clones(c, d, s, NULL);
        si->valid = s->valid;
        si->disk_only = s->disk_only;
        bool ext = false, in = false;
        si->nd = s->nd;
        si->disks = mgr_xcalloc(s->nd, sizeof(*si->disks));
        for (size_t j = 0; j < s->nd; j++) {
            const struct m_snapdisk *sd = &s->disks[j];
            struct mgr_snapdisk_info *di = &si->disks[j];
            di->target = mgr_xstrdup(sd->target);
            di->kind = (int)sd->kind;
            di->image = sd->kind == MK_NO ? NULL : mgr_xstrdup(sd->image);
            di->file = mgr_xstrdup(sd->file);
            di->driver = mgr_xstrdup(sd->driver);
            di->mat = mgr_xstrdup(sd->mat);
            ext |= sd->kind == MK_EXTERNAL;
            in |= sd->kind == MK_INTERNAL;
        }
        si->location = ext ? "external" : in ? "internal" : "none";
        for (size_t j = 0; j < d->ns; j++) {
            if (mgr_streq(d->snaps[j]->parent, s->name)) {
                si->nchildren++;
            }
        }
        si->ndescendants = count_desc(d, s->name);
    }
    for (size_t i = 0; i < c->ni; i++) {
        const struct m_image *im = c->imgs[i];
        bool mine = mgr_streq(im->domain, d->name);
        for (size_t j = 0; !mine && j < o->nd; j++) {
            for (size_t k = 0; k < o->disks[j].nchain; k++) {
                mine |= strcmp(o->disks[j].chain[k], im->path) == 0;
            }
        }
        if (!mine) {
            continue;
        }
        o->images = mgr_xrealloc(o->images, (o->ni + 1) * sizeof(*o->images));
        struct mgr_image_info *ii = &o->images[o->ni++];
        ii->path = mgr_xstrdup(im->path);
        ii->target = mgr_xstrdup(im->target);
        ii->format = mgr_xstrdup(im->format);
        ii->backing = mgr_xstrdup(im->backing);
        ii->owned = im->owned;
    }
    m_cat_free(c);
    *out = o;
    return 0;
}

void mgr_domain_info_free(struct mgr_domain_info *o)
{
    if (!o) {
        return;
    }
    free(o->name);
    free(o->uuid);
    free(o->type);
    free(o->current);
    free(o->origin);
    for (size_t i = 0; i < o->nd; i++) {
        free(o->disks[i].target);
        free(o->disks[i].top);
        free(o->disks[i].format);
        mgr_strv_free(o->disks[i].chain, o->disks[i].nchain);
    }
    free(o->disks);
    for (size_t i = 0; i < o->ns; i++) {
        struct mgr_snap_info *s = &o->snaps[i];
        free(s->name);
        free(s->desc);
        free(s->state);
        free(s->parent);
        for (size_t j = 0; j < s->nd; j++) {
            free(s->disks[j].target);
            free(s->disks[j].image);
            free(s->disks[j].file);
            free(s->disks[j].driver);
            free(s->disks[j].mat);
        }
        free(s->disks);
    }
    free(o->snaps);
    for (size_t i = 0; i < o->ni; i++) {
        free(o->images[i].path);
        free(o->images[i].target);
        free(o->images[i].format);
        free(o->images[i].backing);
    }
    free(o->images);
    free(o);
}

ssize_t mgr_snap_index(const struct mgr_domain_info *d, const char *name)
{
    for (size_t i = 0; name && i < d->ns; i++) {
        if (strcmp(d->snaps[i].name, name) == 0) {
            return (ssize_t)i;
        }
    }
    return -1;
}

static bool is_desc(const struct mgr_domain_info *d, size_t i, const char *anc)
{
    const char *p = d->snaps[i].parent;
    for (size_t guard = 0; p && guard <= d->ns; guard++) {
        if (strcmp(p, anc) == 0) {
            return true;
        }
        ssize_t j = mgr_snap_index(d, p);
        p = j >= 0 ? d->snaps[j].parent : NULL;
    }
    return false;
}

static const struct mgr_domain_info *sort_dom;

static int by_name(const void *a, const void *b)
{
    return strcmp(sort_dom->snaps[*(const size_t *)a].name,
                  sort_dom->snaps[*(const size_t *)b].name);
}

/* Depth-first: a parent before its children, the newest child first (libvirt's order: its
 * moment list prepends each new child). */
static void topo(const struct mgr_domain_info *d, const char *parent, const bool *sel, size_t *out,
                 size_t *n, bool *seen)
{
    for (size_t i = d->ns; i-- > 0;) {
        if (seen[i] || !mgr_streq(d->snaps[i].parent, parent)) {
            continue;
        }
        seen[i] = true;
        if (sel[i]) {
            out[(*n)++] = i;
        }
        topo(d, d->snaps[i].name, sel, out, n, seen);
    }
}

int mgr_snapshot_select(const struct mgr_domain_info *d, const struct mgr_list_opts *o,
                        size_t **idx, size_t *n, struct ct_err *err)
{
    *idx = NULL;
    *n = 0;
    struct mgr_list_opts oc = *o;
    if (o->current) {
        /* virsh: --current starts at the current snapshot, as --from would. */
        if (o->from) {
            return ct_err_set(err, -EINVAL, "--current and --from are mutually exclusive");
        }
        if (!d->current) {
            return ct_err_set(err, -ENOENT, "the domain does not have a current snapshot");
        }
        oc.from = d->current;
        oc.current = false;
    }
    o = &oc;
    if (o->from && mgr_snap_index(d, o->from) < 0) {
        return ct_err_set(err, -ENOENT,
                          "Domain snapshot not found: no domain snapshot with matching name "
                          "'%s'",
                          o->from);
    }
    if (o->leaves && o->no_leaves) {
        return ct_err_set(err, -EINVAL, "--leaves and --no-leaves are mutually exclusive");
    }
    if (o->internal && o->external) {
        return ct_err_set(err, -EINVAL, "--internal and --external are mutually exclusive");
    }
    bool *sel = mgr_xcalloc(d->ns + 1, sizeof(bool));
    for (size_t i = 0; i < d->ns; i++) {
        const struct mgr_snap_info *s = &d->snaps[i];
        bool ok = true;
        if (o->from) {
            if (o->tree && strcmp(s->name, o->from) == 0) {
                ok = true;
            } else if (o->descendants) {
                ok = is_desc(d, i, o->from);
            } else {
                ok = mgr_streq(s->parent, o->from);
            }
        }
        if (o->roots && s->parent) {
            ok = false;
        }
        if (o->leaves && s->nchildren) {
            ok = false;
        }
        if (o->no_leaves && !s->nchildren) {
            ok = false;
        }

        if (o->internal && strcmp(s->location, "external") == 0) {
            ok = false;
        }
        if (o->external && strcmp(s->location, "external") != 0) {
            ok = false;
        }
        if (o->disk_only && !s->disk_only && !mgr_streq(s->state, "disk-snapshot")) {
            ok = false;
        }
        if (o->active && !(mgr_streq(s->state, "running") || mgr_streq(s->state, "paused"))) {
            ok = false;
        }
        if (o->inactive && !mgr_streq(s->state, "shutoff")) {
            ok = false;
        }
        if (o->no_metadata) {
            ok = false; /* every snapshot cowtree lists has metadata */
        }
        sel[i] = ok;
    }
    size_t *out = mgr_xcalloc(d->ns + 1, sizeof(size_t));
    if (o->topological) {
        bool *seen = mgr_xcalloc(d->ns + 1, sizeof(bool));
        topo(d, NULL, sel, out, n, seen);
        for (size_t i = 0; i < d->ns; i++) {
            if (!seen[i] && sel[i]) {
                out[(*n)++] = i; /* parent missing: cannot happen, but never drop one */
            }
        }
        free(seen);
    } else {
        for (size_t i = 0; i < d->ns; i++) {
            if (sel[i]) {
                out[(*n)++] = i;
            }
        }
        sort_dom = d;
        qsort(out, *n, sizeof(size_t), by_name);
        sort_dom = NULL;
    }
    free(sel);
    *idx = out;
    return 0;
}
