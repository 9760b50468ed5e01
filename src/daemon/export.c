/* Block nodes and the bridge from NBD export operations to the image engine. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "daemon/export.h"
#include "nbd/nbd-proto.h"
#include "util/err.h"

struct node_table nodes = {.lock = PTHREAD_MUTEX_INITIALIZER, .released = PTHREAD_COND_INITIALIZER};

/* How long block-export-del waits for clients that are disconnecting. */
#define UNEXPORT_WAIT_NS 2000000000ll

static uint64_t ex_size(void *opaque)
{
    struct node *n = opaque;
    pthread_mutex_lock(&n->lock);
    uint64_t s = ct_image_size(n->img);
    pthread_mutex_unlock(&n->lock);
    return s;
}

static int ex_pread(void *opaque, void *buf, uint32_t len, uint64_t off)
{
    struct node *n = opaque;
    pthread_mutex_lock(&n->lock);
    int r = ct_image_pread(n->img, buf, len, off);
    pthread_mutex_unlock(&n->lock);
    return r;
}

static int ex_pwrite(void *opaque, const void *buf, uint32_t len, uint64_t off, bool fua)
{
    struct node *n = opaque;
    pthread_mutex_lock(&n->lock);
    int r = ct_image_pwrite(n->img, buf, len, off, fua ? CT_WRITE_FUA : 0);
    if (r == 0) {
        node_note_write(n, off, len);
    }
    pthread_mutex_unlock(&n->lock);
    return r;
}

static int ex_flush(void *opaque)
{
    struct node *n = opaque;
    pthread_mutex_lock(&n->lock);
    int r = ct_image_flush(n->img);
    pthread_mutex_unlock(&n->lock);
    return r;
}

static int ex_trim(void *opaque, uint32_t len, uint64_t off, bool fua)
{
    struct node *n = opaque;
    pthread_mutex_lock(&n->lock);
    int r = ct_image_discard(n->img, len, off);
    if (r == 0) {
        node_note_write(n, off, len);
    }
    if (r == 0 && fua) {
        r = ct_image_flush(n->img);
    }
    pthread_mutex_unlock(&n->lock);
    return r;
}

static int ex_zero(void *opaque, uint32_t len, uint64_t off, bool may_trim, bool fua)
{
    struct node *n = opaque;
    pthread_mutex_lock(&n->lock);
    int r = ct_image_pwrite_zeroes(n->img, len, off,
                                   (may_trim ? CT_WRITE_UNMAP : 0) | (fua ? CT_WRITE_FUA : 0));
    if (r == 0) {
        node_note_write(n, off, len);
    }
    pthread_mutex_unlock(&n->lock);
    return r;
}

static int ex_block_status(void *opaque, uint64_t off, uint64_t len, struct nbd_extent *out)
{
    struct node *n = opaque;
    struct ct_map_extent m;
    pthread_mutex_lock(&n->lock);
    int r = ct_image_map(n->img, off, len, &m);
    pthread_mutex_unlock(&n->lock);
    if (r < 0) {
        return r;
    }
    out->len = m.len;
    out->flags = (m.flags & CT_STATUS_ZERO) ? NBD_STATE_HOLE | NBD_STATE_ZERO : 0;
    if ((m.flags & CT_STATUS_ZERO) && (m.flags & CT_STATUS_DATA)) {
        out->flags = NBD_STATE_ZERO;
    }
    return 0;
}

static int ex_alloc_depth(void *opaque, uint64_t off, uint64_t len, struct nbd_extent *out)
{
    struct node *n = opaque;
    struct ct_map_extent m;
    pthread_mutex_lock(&n->lock);
    int r = ct_image_map(n->img, off, len, &m);
    pthread_mutex_unlock(&n->lock);
    if (r < 0) {
        return r;
    }
    out->len = m.len;
    out->flags = (m.flags & CT_STATUS_ALLOCATED) ? m.depth + 1 : 0;
    return 0;
}

static const struct nbd_export_ops node_ops = {
    .size = ex_size,
    .pread = ex_pread,
    .pwrite = ex_pwrite,
    .flush = ex_flush,
    .trim = ex_trim,
    .zero = ex_zero,
    .block_status = ex_block_status,
    .alloc_depth = ex_alloc_depth,
};

struct node *node_find(const char *name)
{
    for (struct node *n = nodes.head; n; n = n->next) {
        if (strcmp(n->name, name) == 0) {
            return n;
        }
    }
    return NULL;
}

int node_add(const char *name, const char *file, const char *format, bool writable,
             struct ct_err *err)
{
    pthread_mutex_lock(&nodes.lock);
    if (node_find(name)) {
        pthread_mutex_unlock(&nodes.lock);
        return ct_err_set(err, -EEXIST, "node-name '%s' is already in use", name);
    }
    pthread_mutex_unlock(&nodes.lock);
    struct ct_image *img;
    struct ct_open_opts o = {.format = format, .flags = writable ? CT_OPEN_WRITE : 0};
    int r = ct_image_open(&img, file, &o, err);
    if (r < 0) {
        return r;
    }
    struct node *n = calloc(1, sizeof(*n));
    if (!n) {
        ct_image_close(img, NULL);
        return ct_err_set(err, -ENOMEM, "out of memory");
    }
    n->name = strdup(name);
    n->file = strdup(file);
    n->format = strdup(ct_image_format(img));
    n->img = img;
    n->writable = writable;
    pthread_mutex_init(&n->lock, NULL);
    n->exp.ops = &node_ops;
    n->exp.opaque = n;
    n->exp.multi_conn = true; /* one handle per node: a flush covers every connection */
    pthread_mutex_lock(&nodes.lock);
    n->next = nodes.head;
    nodes.head = n;
    pthread_mutex_unlock(&nodes.lock);
    return 0;
}

int node_export(struct node *n, const char *export_name, bool writable, struct ct_err *err)
{
    pthread_mutex_lock(&nodes.lock);
    for (struct node *m = nodes.head; m; m = m->next) {
        if (m->exp.name && strcmp(m->exp.name, export_name) == 0) {
            pthread_mutex_unlock(&nodes.lock);
            return ct_err_set(err, -EEXIST, "an export named '%s' already exists", export_name);
        }
    }
    if (writable && !n->writable) {
        pthread_mutex_unlock(&nodes.lock);
        return ct_err_set(err, -EROFS, "node '%s' is read-only", n->name);
    }
    free((char *)n->exp.name);
    n->exp.name = strdup(export_name);
    if (!n->export_id) {
        n->export_id = strdup(export_name);
    }
    n->exp.writable = writable;
    pthread_mutex_unlock(&nodes.lock);
    return 0;
}

void node_set_image(struct node *n, struct ct_image *img, const char *file, const char *format)
{
    n->img = img;
    free(n->file);
    free(n->format);
    n->file = strdup(file);
    n->format = strdup(format);
}

int node_unexport(const char *export_id, struct ct_err *err)
{
    pthread_mutex_lock(&nodes.lock);
    struct node *n = nodes.head;
    while (n && !(n->exp.name && n->export_id && strcmp(n->export_id, export_id) == 0)) {
        n = n->next;
    }
    int r = 0;
    /* A client that just hung up may not have been released yet: give it a moment (the
     * condition, not the time, ends the wait when it goes). */
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += UNEXPORT_WAIT_NS / 1000000000ll;
    while (n && n->users &&
           pthread_cond_timedwait(&nodes.released, &nodes.lock, &until) != ETIMEDOUT) {
    }
    if (!n) {
        r = ct_err_set(err, -ENOENT, "Export '%s' is not found", export_id);
    } else if (n->users) {
        r = ct_err_set(err, -EBUSY, "export '%s' still in use (%d client%s connected)", export_id,
                       n->users, n->users == 1 ? "" : "s");
    } else {
        free((char *)n->exp.name);
        free(n->export_id);
        n->exp.name = NULL;
        n->export_id = NULL;
    }
    pthread_mutex_unlock(&nodes.lock);
    return r;
}

/* Unlink the node called name from the table for blockdev-del (why_exported names the refusal
 * when it is exported) or, with need_writable, for a mirror; nodes.lock held. Returns the
 * node, or NULL with err set. The node's image is left to the caller. */
static struct node *unlink_node_locked(const char *name, const char *why_exported,
                                       bool need_writable, struct ct_err *err)
{
    struct node **pp = &nodes.head;
    while (*pp && strcmp((*pp)->name, name) != 0) {
        pp = &(*pp)->next;
    }
    struct node *n = *pp;
    if (!n) {
        ct_err_set(err, -ENOENT, "Cannot find device='%s' nor node-name='%s'", name, name);
        return NULL;
    }
    if (n->exp.name || n->users) {
        ct_err_set(err, -EBUSY, "Node '%s' %s", name, why_exported);
        return NULL;
    }
    if (need_writable && !n->writable) {
        ct_err_set(err, -EROFS, "Node '%s' is read-only", name);
        return NULL;
    }
    pthread_mutex_lock(&n->lock);
    const char *busy = n->busy_job;
    pthread_mutex_unlock(&n->lock);
    if (busy) {
        ct_err_set(err, -EBUSY, "Node '%s' is busy: block device is in use by block job: %s", name,
                   busy);
        return NULL;
    }
    *pp = n->next;
    return n;
}

static void node_free(struct node *n)
{
    pthread_mutex_destroy(&n->lock);
    free(n->name);
    free(n->file);
    free(n->format);
    free((char *)n->exp.name);
    free(n->export_id);
    free(n);
}

int node_del(const char *name, struct ct_err *err)
{
    pthread_mutex_lock(&nodes.lock);
    struct node *n = unlink_node_locked(name, "is in use by an export", false, err);
    pthread_mutex_unlock(&nodes.lock);
    if (!n) {
        return err ? err->code : -ENOENT;
    }
    int r = ct_image_close(n->img, err);
    node_free(n);
    return r;
}

int node_take(const char *name, struct ct_image **img, struct ct_err *err)
{
    pthread_mutex_lock(&nodes.lock);
    struct node *n =
        unlink_node_locked(name, "is exported: it cannot be a mirror target", true, err);
    pthread_mutex_unlock(&nodes.lock);
    if (!n) {
        return err ? err->code : -ENOENT;
    }
    *img = n->img;
    node_free(n);
    return 0;
}

void node_close_all(void)
{
    pthread_mutex_lock(&nodes.lock);
    for (struct node *n = nodes.head; n;) {
        struct node *next = n->next;
        pthread_mutex_lock(&n->lock);
        ct_image_close(n->img, NULL);
        pthread_mutex_unlock(&n->lock);
        node_free(n);
        n = next;
    }
    nodes.head = NULL;
    pthread_mutex_unlock(&nodes.lock);
}

static struct nbd_export *exports_find(void *opaque, const char *name)
{
    struct nbd_export *e = NULL;
    pthread_mutex_lock(&nodes.lock);
    for (struct node *n = nodes.head; n; n = n->next) {
        if (n->exp.name && strcmp(n->exp.name, name) == 0) {
            n->users++;
            e = &n->exp;
            break;
        }
    }
    pthread_mutex_unlock(&nodes.lock);
    return e;
}

static void exports_release(void *opaque, struct nbd_export *e)
{
    pthread_mutex_lock(&nodes.lock);
    ((struct node *)e->opaque)->users--;
    pthread_cond_broadcast(&nodes.released);
    pthread_mutex_unlock(&nodes.lock);
}

static void exports_list(void *opaque, void (*fn)(void *arg, const struct nbd_export *e), void *arg)
{
    pthread_mutex_lock(&nodes.lock);
    for (struct node *n = nodes.head; n; n = n->next) {
        if (n->exp.name) {
            fn(arg, &n->exp);
        }
    }
    pthread_mutex_unlock(&nodes.lock);
}

const struct nbd_exports node_exports = {
    .find = exports_find,
    .release = exports_release,
    .list = exports_list,
    .threads = 8, /* requests of one connection executed at once (docs/daemon.md) */
};
