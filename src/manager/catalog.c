/*
 * The catalog: an SQLite database (WAL mode) at HOME/catalog.db, and its in-memory model.
 *
 * Tables (schema version 1):
 *   domains(name, uuid, type, xml, current, origin, created)
 *   disks(domain, target, idx, top, format)
 *   images(path, domain, target, format, backing, backing_fmt, owned)
 *   snapshots(domain, name, description, ctime, state, parent, protected, valid, disk_only, seq)
 *   snapdisks(domain, snap, target, idx, kind, image, file, driver, mat)
 *   plans(id, domain, op, created, state, error) and steps(plan, seq, kind, a..e, n, bytes,
 *   done): the journal (journal.c).
 *   runstate(domain, state, reason, id, since): running domains (live.c); a row saying
 *   running is believed only while the daemon has the domain's disks open.
 *   livejobs(domain, target, job, type, args, started): block jobs running in the daemon.
 *   (Both added to schema 1 with CREATE IF NOT EXISTS: older catalogs gain them on open.)
 *
 * Invariants:
 *  K1. The model is written back only as a whole per domain (delete its rows, insert the new
 *      ones) plus the whole image table, in one transaction: a reader never sees half of an
 *      operation's catalog change.
 *  K2. Every process holds HOME/lock (flock, exclusive) from cat_open to cat_close, so the
 *      catalog and the files only ever change under one process.
 */
#include <errno.h>
#include <fcntl.h>
#include <sqlite3.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "manager/manager-int.h"
#include "util/err.h"

static const char schema[] =
    "CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);"
    "CREATE TABLE IF NOT EXISTS domains(name TEXT PRIMARY KEY, uuid TEXT NOT NULL,"
    " type TEXT NOT NULL, xml TEXT, current TEXT, origin TEXT, created INTEGER NOT NULL);"
    "CREATE TABLE IF NOT EXISTS disks(domain TEXT NOT NULL, target TEXT NOT NULL,"
    " idx INTEGER NOT NULL, top TEXT NOT NULL, format TEXT NOT NULL,"
    " PRIMARY KEY(domain, target));"
    "CREATE TABLE IF NOT EXISTS images(path TEXT PRIMARY KEY, domain TEXT, target TEXT,"
    " format TEXT NOT NULL, backing TEXT, backing_fmt TEXT, owned INTEGER NOT NULL);"
    "CREATE TABLE IF NOT EXISTS snapshots(domain TEXT NOT NULL, name TEXT NOT NULL,"
    " description TEXT, ctime INTEGER NOT NULL, state TEXT NOT NULL, parent TEXT,"
    " protected INTEGER NOT NULL, valid INTEGER NOT NULL, disk_only INTEGER NOT NULL,"
    " seq INTEGER NOT NULL, PRIMARY KEY(domain, name));"
    "CREATE TABLE IF NOT EXISTS snapdisks(domain TEXT NOT NULL, snap TEXT NOT NULL,"
    " target TEXT NOT NULL, idx INTEGER NOT NULL, kind TEXT NOT NULL, image TEXT, file TEXT,"
    " driver TEXT, mat TEXT, PRIMARY KEY(domain, snap, target));"
    "CREATE TABLE IF NOT EXISTS plans(id INTEGER PRIMARY KEY, domain TEXT, op TEXT NOT NULL,"
    " created INTEGER NOT NULL, state TEXT NOT NULL, error TEXT);"
    "CREATE TABLE IF NOT EXISTS steps(plan INTEGER NOT NULL, seq INTEGER NOT NULL,"
    " kind TEXT NOT NULL, a TEXT, b TEXT, c TEXT, d TEXT, e TEXT, n INTEGER, bytes INTEGER,"
    " done INTEGER NOT NULL, PRIMARY KEY(plan, seq));"
    "CREATE TABLE IF NOT EXISTS runstate(domain TEXT PRIMARY KEY, state TEXT NOT NULL,"
    " reason TEXT, id INTEGER, since INTEGER NOT NULL);"
    "CREATE TABLE IF NOT EXISTS livejobs(domain TEXT NOT NULL, target TEXT NOT NULL,"
    " job TEXT NOT NULL, type TEXT NOT NULL, args TEXT NOT NULL, started INTEGER NOT NULL,"
    " PRIMARY KEY(domain, target));"
    "INSERT OR IGNORE INTO meta(key, value) VALUES('schema', '1');";

/* ---- model ---- */

static void snapdisk_fini(struct m_snapdisk *sd)
{
    free(sd->target);
    free(sd->image);
    free(sd->file);
    free(sd->driver);
    free(sd->mat);
}

void m_snap_free(struct m_snap *s)
{
    if (!s) {
        return;
    }
    free(s->name);
    free(s->desc);
    free(s->state);
    free(s->parent);
    for (size_t i = 0; i < s->nd; i++) {
        snapdisk_fini(&s->disks[i]);
    }
    free(s->disks);
    free(s);
}

void m_domain_free(struct m_domain *d)
{
    if (!d) {
        return;
    }
    free(d->name);
    free(d->uuid);
    free(d->type);
    free(d->xml);
    free(d->current);
    free(d->origin);
    for (size_t i = 0; i < d->nd; i++) {
        free(d->disks[i].target);
        free(d->disks[i].top);
        free(d->disks[i].format);
    }
    free(d->disks);
    for (size_t i = 0; i < d->ns; i++) {
        m_snap_free(d->snaps[i]);
    }
    free(d->snaps);
    free(d);
}

static void image_free(struct m_image *im)
{
    free(im->path);
    free(im->domain);
    free(im->target);
    free(im->format);
    free(im->backing);
    free(im->backing_fmt);
    free(im);
}

void m_cat_free(struct m_cat *c)
{
    if (!c) {
        return;
    }
    for (size_t i = 0; i < c->nd; i++) {
        m_domain_free(c->doms[i]);
    }
    free(c->doms);
    for (size_t i = 0; i < c->ni; i++) {
        image_free(c->imgs[i]);
    }
    free(c->imgs);
    free(c);
}

struct m_domain *m_domain_find(struct m_cat *c, const char *name)
{
    for (size_t i = 0; i < c->nd; i++) {
        if (!c->doms[i]->removed && strcmp(c->doms[i]->name, name) == 0) {
            return c->doms[i];
        }
    }
    return NULL;
}

struct m_snap *m_snap_find(struct m_domain *d, const char *name)
{
    for (size_t i = 0; name && i < d->ns; i++) {
        if (strcmp(d->snaps[i]->name, name) == 0) {
            return d->snaps[i];
        }
    }
    return NULL;
}

struct m_disk *m_disk_find(struct m_domain *d, const char *target_or_path)
{
    for (size_t i = 0; i < d->nd; i++) {
        if (strcmp(d->disks[i].target, target_or_path) == 0) {
            return &d->disks[i];
        }
    }
    char *abs = target_or_path[0] == '/' ? mgr_abspath(target_or_path) : NULL;
    struct m_disk *found = NULL;
    for (size_t i = 0; abs && i < d->nd; i++) {
        if (strcmp(d->disks[i].top, abs) == 0) {
            found = &d->disks[i];
        }
    }
    free(abs);
    return found;
}

struct m_snapdisk *m_snapdisk_find(struct m_snap *s, const char *target)
{
    for (size_t i = 0; i < s->nd; i++) {
        if (strcmp(s->disks[i].target, target) == 0) {
            return &s->disks[i];
        }
    }
    return NULL;
}

struct m_image *m_image_find(struct m_cat *c, const char *path)
{
    for (size_t i = 0; path && i < c->ni; i++) {
        if (strcmp(c->imgs[i]->path, path) == 0) {
            return c->imgs[i];
        }
    }
    return NULL;
}

struct m_image *m_image_add(struct m_cat *c, const char *path, const char *domain,
                            const char *target, const char *format, const char *backing,
                            const char *backing_fmt, bool owned)
{
    struct m_image *im = m_image_find(c, path);
    if (!im) {
        im = mgr_xcalloc(1, sizeof(*im));
        im->path = mgr_xstrdup(path);
        c->imgs = mgr_xrealloc(c->imgs, (c->ni + 1) * sizeof(*c->imgs));
        c->imgs[c->ni++] = im;
    }
    mgr_setstr(&im->domain, domain);
    mgr_setstr(&im->target, target);
    mgr_setstr(&im->format, format);
    mgr_setstr(&im->backing, backing);
    mgr_setstr(&im->backing_fmt, backing ? backing_fmt : NULL);
    im->owned = owned;
    c->images_dirty = true;
    return im;
}

void m_image_remove(struct m_cat *c, const char *path)
{
    for (size_t i = 0; i < c->ni; i++) {
        if (strcmp(c->imgs[i]->path, path) == 0) {
            image_free(c->imgs[i]);
            memmove(&c->imgs[i], &c->imgs[i + 1], (c->ni - i - 1) * sizeof(*c->imgs));
            c->ni--;
            c->images_dirty = true;
            return;
        }
    }
}

void m_snap_remove(struct m_domain *d, struct m_snap *s)
{
    for (size_t i = 0; i < d->ns; i++) {
        if (d->snaps[i] != s && mgr_streq(d->snaps[i]->parent, s->name)) {
            mgr_setstr(&d->snaps[i]->parent, s->parent);
        }
    }
    if (mgr_streq(d->current, s->name)) {
        mgr_setstr(&d->current, s->parent);
    }
    for (size_t i = 0; i < d->ns; i++) {
        if (d->snaps[i] == s) {
            memmove(&d->snaps[i], &d->snaps[i + 1], (d->ns - i - 1) * sizeof(*d->snaps));
            d->ns--;
            break;
        }
    }
    m_snap_free(s);
    d->dirty = true;
}

static void retarget_str(char **slot, const char *from, const char *to, bool *changed)
{
    if (*slot && strcmp(*slot, from) == 0) {
        mgr_setstr(slot, to);
        *changed = true;
    }
}

void m_retarget(struct m_cat *c, const char *from, const char *to)
{
    for (size_t i = 0; i < c->nd; i++) {
        struct m_domain *d = c->doms[i];
        bool ch = false;
        for (size_t j = 0; j < d->nd; j++) {
            retarget_str(&d->disks[j].top, from, to, &ch);
        }
        for (size_t j = 0; j < d->ns; j++) {
            for (size_t k = 0; k < d->snaps[j]->nd; k++) {
                struct m_snapdisk *sd = &d->snaps[j]->disks[k];
                retarget_str(&sd->image, from, to, &ch);
                retarget_str(&sd->file, from, to, &ch);
                retarget_str(&sd->mat, from, to, &ch);
            }
        }
        if (ch) {
            d->dirty = true;
        }
    }
    for (size_t i = 0; i < c->ni; i++) {
        bool ch = false;
        retarget_str(&c->imgs[i]->backing, from, to, &ch);
        if (ch) {
            c->images_dirty = true;
        }
    }
}

size_t m_children(struct m_cat *c, const char *path, struct m_image **first)
{
    size_t n = 0;
    if (first) {
        *first = NULL;
    }
    for (size_t i = 0; i < c->ni; i++) {
        if (mgr_streq(c->imgs[i]->backing, path)) {
            if (first && !*first) {
                *first = c->imgs[i];
            }
            n++;
        }
    }
    return n;
}

bool m_active_referenced(struct m_cat *c, const char *path, char **why)
{
    for (size_t i = 0; i < c->nd; i++) {
        struct m_domain *d = c->doms[i];
        if (d->removed) {
            continue;
        }
        for (size_t j = 0; j < d->nd; j++) {
            if (strcmp(d->disks[j].top, path) == 0) {
                if (why) {
                    *why = mgr_xasprintf("it is the active image of %s's disk %s", d->name,
                                         d->disks[j].target);
                }
                return true;
            }
        }
        for (size_t j = 0; j < d->ns; j++) {
            struct m_snap *s = d->snaps[j];
            for (size_t k = 0; k < s->nd; k++) {
                struct m_snapdisk *sd = &s->disks[k];
                if ((sd->kind == MK_EXTERNAL && mgr_streq(sd->image, path)) ||
                    (sd->kind == MK_INTERNAL && mgr_streq(sd->mat, path))) {
                    if (why) {
                        *why = mgr_xasprintf("it holds the state of snapshot %s of %s", s->name,
                                             d->name);
                    }
                    return true;
                }
            }
        }
    }
    struct m_image *child;
    if (m_children(c, path, &child)) {
        if (why) {
            *why = mgr_xasprintf("it is the backing file of %s", child->path);
        }
        return true;
    }
    return false;
}

bool m_snap_has_clones(struct m_cat *c, const struct m_domain *d, const struct m_snap *s,
                       char **clone_dom)
{
    for (size_t i = 0; i < s->nd; i++) {
        const struct m_snapdisk *sd = &s->disks[i];
        const char *state = sd->kind == MK_EXTERNAL   ? sd->image
                            : sd->kind == MK_INTERNAL ? sd->mat
                                                      : NULL;
        for (size_t j = 0; state && j < c->ni; j++) {
            const struct m_image *im = c->imgs[j];
            if (mgr_streq(im->backing, state) && im->domain && !mgr_streq(im->domain, d->name)) {
                if (clone_dom) {
                    *clone_dom = mgr_xstrdup(im->domain);
                }
                return true;
            }
        }
    }
    return false;
}

void m_forget_unused_unowned(struct m_cat *c)
{
    for (bool again = true; again;) {
        again = false;
        for (size_t i = 0; i < c->ni; i++) {
            struct m_image *im = c->imgs[i];
            if (!im->owned && !m_children(c, im->path, NULL) && !m_named_by_snapshot(c, im->path)) {
                m_image_remove(c, im->path);
                again = true;
                break;
            }
        }
    }
}

bool m_named_by_snapshot(struct m_cat *c, const char *path)
{
    for (size_t i = 0; i < c->nd; i++) {
        struct m_domain *d = c->doms[i];
        if (d->removed) {
            continue;
        }
        for (size_t j = 0; j < d->nd; j++) {
            if (strcmp(d->disks[j].top, path) == 0) {
                return true;
            }
        }
        for (size_t j = 0; j < d->ns; j++) {
            for (size_t k = 0; k < d->snaps[j]->nd; k++) {
                struct m_snapdisk *sd = &d->snaps[j]->disks[k];
                if (sd->kind != MK_NO && (mgr_streq(sd->image, path) || mgr_streq(sd->mat, path))) {
                    return true;
                }
            }
        }
    }
    return false;
}

/* ---- SQLite ---- */

static int db_err(struct mgr *m, int rc, const char *what, struct ct_err *err)
{
    return ct_err_set(err, rc == SQLITE_BUSY ? -CT_E_BUSY : -EIO, "catalog %s: %s", what,
                      m->db ? sqlite3_errmsg(m->db) : sqlite3_errstr(rc));
}

int cat_exec(struct mgr *m, const char *sql, struct ct_err *err)
{
    char *msg = NULL;
    int rc = sqlite3_exec(m->db, sql, NULL, NULL, &msg);
    if (rc != SQLITE_OK) {
        int r = ct_err_set(err, -EIO, "catalog: %s", msg ? msg : sqlite3_errstr(rc));
        sqlite3_free(msg);
        return r;
    }
    return 0;
}

int cat_exec_txn(struct mgr *m, const char *sql, struct ct_err *err)
{
    int r = cat_exec(m, "BEGIN IMMEDIATE", err);
    if (r < 0) {
        return r;
    }
    r = cat_exec(m, sql, err);
    if (r < 0) {
        cat_exec(m, "ROLLBACK", NULL);
        return r;
    }
    return cat_exec(m, "COMMIT", err);
}

static int mkdir_p(const char *path)
{
    char *p = mgr_xstrdup(path);
    for (char *s = p + 1; *s; s++) {
        if (*s == '/') {
            *s = '\0';
            if (mkdir(p, 0700) < 0 && errno != EEXIST) {
                int e = errno;
                free(p);
                return -e;
            }
            *s = '/';
        }
    }
    int r = (mkdir(p, 0700) < 0 && errno != EEXIST) ? -errno : 0;
    free(p);
    return r;
}

int cat_open(struct mgr *m, struct ct_err *err)
{
    int r = mkdir_p(m->home);
    if (r < 0) {
        return ct_err_set(err, r, "cannot create the catalog directory '%s': %s", m->home,
                          strerror(-r));
    }
    char *lock = mgr_xasprintf("%s/lock", m->home);
    m->lock_fd = open(lock, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (m->lock_fd < 0) {
        int e = errno;
        r = ct_err_set(err, -e, "cannot open '%s': %s", lock, strerror(e));
        free(lock);
        return r;
    }
    while (flock(m->lock_fd, LOCK_EX) < 0) {
        if (errno != EINTR) {
            int e = errno;
            r = ct_err_set(err, -e, "cannot lock '%s': %s", lock, strerror(e));
            free(lock);
            return r;
        }
    }
    free(lock);
    char *db = mgr_xasprintf("%s/catalog.db", m->home);
    int rc = sqlite3_open_v2(db, &m->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, NULL);
    free(db);
    if (rc != SQLITE_OK) {
        return db_err(m, rc, "open", err);
    }
    sqlite3_busy_timeout(m->db, 10000);
    /* WAL keeps readers of other tools working while we write; FULL syncs each commit so a
     * done mark is durable before the next step starts. */
    r = cat_exec(m, "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;", err);
    if (r == 0) {
        r = cat_exec_txn(m, schema, err);
    }
    return r;
}

void cat_close(struct mgr *m)
{
    if (m->db) {
        sqlite3_close(m->db);
        m->db = NULL;
    }
    if (m->lock_fd >= 0) {
        close(m->lock_fd);
        m->lock_fd = -1;
    }
}

static char *col(sqlite3_stmt *st, int i)
{
    const unsigned char *t = sqlite3_column_text(st, i);
    return t ? mgr_xstrdup((const char *)t) : NULL;
}

static int prepare(struct mgr *m, const char *sql, sqlite3_stmt **st, struct ct_err *err)
{
    int rc = sqlite3_prepare_v2(m->db, sql, -1, st, NULL);
    return rc == SQLITE_OK ? 0 : db_err(m, rc, "query", err);
}

static enum m_kind kind_parse(const char *s)
{
    if (mgr_streq(s, "internal")) {
        return MK_INTERNAL;
    }
    if (mgr_streq(s, "external")) {
        return MK_EXTERNAL;
    }
    return MK_NO;
}

int cat_load(struct mgr *m, struct m_cat **out, struct ct_err *err)
{
    struct m_cat *c = mgr_xcalloc(1, sizeof(*c));
    sqlite3_stmt *st = NULL;
    int r = prepare(m,
                    "SELECT name, uuid, type, xml, current, origin, created FROM domains "
                    "ORDER BY created, name",
                    &st, err);
    while (r == 0 && sqlite3_step(st) == SQLITE_ROW) {
        struct m_domain *d = mgr_xcalloc(1, sizeof(*d));
        d->name = col(st, 0);
        d->uuid = col(st, 1);
        d->type = col(st, 2);
        d->xml = col(st, 3);
        d->current = col(st, 4);
        d->origin = col(st, 5);
        d->created = sqlite3_column_int64(st, 6);
        c->doms = mgr_xrealloc(c->doms, (c->nd + 1) * sizeof(*c->doms));
        c->doms[c->nd++] = d;
    }
    sqlite3_finalize(st);
    st = NULL;
    if (r == 0) {
        r = prepare(m, "SELECT domain, target, top, format FROM disks ORDER BY domain, idx", &st,
                    err);
    }
    while (r == 0 && sqlite3_step(st) == SQLITE_ROW) {
        struct m_domain *d = m_domain_find(c, (const char *)sqlite3_column_text(st, 0));
        if (!d) {
            continue;
        }
        d->disks = mgr_xrealloc(d->disks, (d->nd + 1) * sizeof(*d->disks));
        struct m_disk *k = &d->disks[d->nd++];
        k->target = col(st, 1);
        k->top = col(st, 2);
        k->format = col(st, 3);
    }
    sqlite3_finalize(st);
    st = NULL;
    if (r == 0) {
        r = prepare(m,
                    "SELECT domain, name, description, ctime, state, parent, protected, valid, "
                    "disk_only, seq FROM snapshots ORDER BY domain, seq",
                    &st, err);
    }
    while (r == 0 && sqlite3_step(st) == SQLITE_ROW) {
        struct m_domain *d = m_domain_find(c, (const char *)sqlite3_column_text(st, 0));
        if (!d) {
            continue;
        }
        struct m_snap *s = mgr_xcalloc(1, sizeof(*s));
        s->name = col(st, 1);
        s->desc = col(st, 2);
        s->ctime = sqlite3_column_int64(st, 3);
        s->state = col(st, 4);
        s->parent = col(st, 5);
        s->protect = sqlite3_column_int(st, 6) != 0;
        s->valid = sqlite3_column_int(st, 7) != 0;
        s->disk_only = sqlite3_column_int(st, 8) != 0;
        s->seq = sqlite3_column_int64(st, 9);
        if (s->seq >= c->next_seq) {
            c->next_seq = s->seq + 1;
        }
        d->snaps = mgr_xrealloc(d->snaps, (d->ns + 1) * sizeof(*d->snaps));
        d->snaps[d->ns++] = s;
    }
    sqlite3_finalize(st);
    st = NULL;
    if (r == 0) {
        r = prepare(m,
                    "SELECT domain, snap, target, kind, image, file, driver, mat FROM "
                    "snapdisks ORDER BY domain, snap, idx",
                    &st, err);
    }
    while (r == 0 && sqlite3_step(st) == SQLITE_ROW) {
        struct m_domain *d = m_domain_find(c, (const char *)sqlite3_column_text(st, 0));
        struct m_snap *s = d ? m_snap_find(d, (const char *)sqlite3_column_text(st, 1)) : NULL;
        if (!s) {
            continue;
        }
        s->disks = mgr_xrealloc(s->disks, (s->nd + 1) * sizeof(*s->disks));
        struct m_snapdisk *sd = &s->disks[s->nd++];
        memset(sd, 0, sizeof(*sd));
        sd->target = col(st, 2);
        char *k = col(st, 3);
        sd->kind = kind_parse(k);
        free(k);
        sd->image = col(st, 4);
        sd->file = col(st, 5);
        sd->driver = col(st, 6);
        sd->mat = col(st, 7);
    }
    sqlite3_finalize(st);
    st = NULL;
    if (r == 0) {
        r = prepare(m,
                    "SELECT path, domain, target, format, backing, backing_fmt, owned FROM "
                    "images ORDER BY rowid",
                    &st, err);
    }
    while (r == 0 && sqlite3_step(st) == SQLITE_ROW) {
        struct m_image *im = mgr_xcalloc(1, sizeof(*im));
        im->path = col(st, 0);
        im->domain = col(st, 1);
        im->target = col(st, 2);
        im->format = col(st, 3);
        im->backing = col(st, 4);
        im->backing_fmt = col(st, 5);
        im->owned = sqlite3_column_int(st, 6) != 0;
        c->imgs = mgr_xrealloc(c->imgs, (c->ni + 1) * sizeof(*c->imgs));
        c->imgs[c->ni++] = im;
    }
    sqlite3_finalize(st);
    if (r < 0) {
        m_cat_free(c);
        return r;
    }
    if (c->next_seq == 0) {
        c->next_seq = 1;
    }
    *out = c;
    return 0;
}

static void sql_add(struct sbuf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *s = sqlite3_vmprintf(fmt, ap);
    va_end(ap);
    if (!s) {
        abort();
    }
    sb_adds(b, s);
    sb_adds(b, ";\n");
    sqlite3_free(s);
}

static const char *kind_str(enum m_kind k)
{
    return k == MK_INTERNAL ? "internal" : k == MK_EXTERNAL ? "external" : "no";
}

char *cat_sql(const struct m_cat *c)
{
    struct sbuf b = {0};
    for (size_t i = 0; i < c->nd; i++) {
        const struct m_domain *d = c->doms[i];
        if (!d->dirty && !d->removed) {
            continue;
        }
        sql_add(&b, "DELETE FROM domains WHERE name=%Q", d->name);
        sql_add(&b, "DELETE FROM disks WHERE domain=%Q", d->name);
        sql_add(&b, "DELETE FROM snapshots WHERE domain=%Q", d->name);
        sql_add(&b, "DELETE FROM snapdisks WHERE domain=%Q", d->name);
        if (d->removed) {
            continue;
        }
        sql_add(&b,
                "INSERT INTO domains(name, uuid, type, xml, current, origin, created) "
                "VALUES(%Q, %Q, %Q, %Q, %Q, %Q, %lld)",
                d->name, d->uuid, d->type, d->xml, d->current, d->origin, (long long)d->created);
        for (size_t j = 0; j < d->nd; j++) {
            sql_add(&b,
                    "INSERT INTO disks(domain, target, idx, top, format) VALUES(%Q, %Q, %d, "
                    "%Q, %Q)",
                    d->name, d->disks[j].target, (int)j, d->disks[j].top, d->disks[j].format);
        }
        for (size_t j = 0; j < d->ns; j++) {
            const struct m_snap *s = d->snaps[j];
            sql_add(&b,
                    "INSERT INTO snapshots(domain, name, description, ctime, state, parent, "
                    "protected, valid, disk_only, seq) VALUES(%Q, %Q, %Q, %lld, %Q, %Q, %d, "
                    "%d, %d, %lld)",
                    d->name, s->name, s->desc, (long long)s->ctime, s->state, s->parent,
                    s->protect ? 1 : 0, s->valid ? 1 : 0, s->disk_only ? 1 : 0, (long long)s->seq);
            for (size_t k = 0; k < s->nd; k++) {
                const struct m_snapdisk *sd = &s->disks[k];
                sql_add(&b,
                        "INSERT INTO snapdisks(domain, snap, target, idx, kind, image, file, "
                        "driver, mat) VALUES(%Q, %Q, %Q, %d, %Q, %Q, %Q, %Q, %Q)",
                        d->name, s->name, sd->target, (int)k, kind_str(sd->kind), sd->image,
                        sd->file, sd->driver, sd->mat);
            }
        }
    }
    if (c->images_dirty) {
        sql_add(&b, "DELETE FROM images");
        for (size_t i = 0; i < c->ni; i++) {
            const struct m_image *im = c->imgs[i];
            sql_add(&b,
                    "INSERT INTO images(path, domain, target, format, backing, backing_fmt, "
                    "owned) VALUES(%Q, %Q, %Q, %Q, %Q, %Q, %d)",
                    im->path, im->domain, im->target, im->format, im->backing, im->backing_fmt,
                    im->owned ? 1 : 0);
        }
    }
    return sb_steal(&b);
}
