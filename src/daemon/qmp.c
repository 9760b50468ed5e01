/*
 * QMP server. Commands use QEMU's names and arguments where QEMU has them; differences are
 * listed in docs/daemon.md. One thread per client; commands that change a node take the
 * node's lock, which quiesces that disk: requests in flight finish first, new ones wait.
 */
#include <errno.h>
#include <json-c/json.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "daemon/export.h"
#include "daemon/qmp.h"

#define QMP_MAX_MESSAGE (1u << 20)

struct client {
    int fd;
    bool negotiated;
    pthread_mutex_t wlock;
    struct client *next;
};

static pthread_mutex_t clients_lock = PTHREAD_MUTEX_INITIALIZER;
static struct client *clients;

static void send_json(struct client *c, json_object *o)
{
    const char *s =
        json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE);
    pthread_mutex_lock(&c->wlock);
    size_t n = strlen(s);
    const char *p = s;
    while (n > 0) {
        ssize_t w = send(c->fd, p, n, MSG_NOSIGNAL);
        if (w <= 0) {
            break;
        }
        p += w;
        n -= (size_t)w;
    }
    send(c->fd, "\r\n", 2, MSG_NOSIGNAL);
    pthread_mutex_unlock(&c->wlock);
}

void qmp_event(const char *name, json_object *data)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    json_object *ev = json_object_new_object();
    json_object_object_add(ev, "event", json_object_new_string(name));
    if (data) {
        json_object_object_add(ev, "data", data);
    }
    json_object *t = json_object_new_object();
    json_object_object_add(t, "seconds", json_object_new_int64(ts.tv_sec));
    json_object_object_add(t, "microseconds", json_object_new_int64(ts.tv_nsec / 1000));
    json_object_object_add(ev, "timestamp", t);
    pthread_mutex_lock(&clients_lock);
    for (struct client *c = clients; c; c = c->next) {
        if (c->negotiated) {
            send_json(c, ev);
        }
    }
    pthread_mutex_unlock(&clients_lock);
    json_object_put(ev);
}

/* ---- replies ---- */

int qmp_fail(struct qmp_reply *r, const char *klass, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->desc, sizeof(r->desc), fmt, ap);
    va_end(ap);
    r->klass = klass;
    return -1;
}

const char *qmp_arg_str(json_object *args, const char *key)
{
    json_object *v;
    if (!args || !json_object_object_get_ex(args, key, &v) ||
        json_object_get_type(v) != json_type_string) {
        return NULL;
    }
    return json_object_get_string(v);
}

bool qmp_arg_bool(json_object *args, const char *key, bool def)
{
    json_object *v;
    if (!args || !json_object_object_get_ex(args, key, &v)) {
        return def;
    }
    return json_object_get_boolean(v);
}

/* device / node-name argument → node */
struct node *qmp_arg_node(json_object *args, struct qmp_reply *r)
{
    const char *name = qmp_arg_str(args, "node-name");
    if (!name) {
        name = qmp_arg_str(args, "device");
    }
    if (!name) {
        qmp_fail(r, "GenericError", "Cannot find device='' nor node-name=''");
        return NULL;
    }
    pthread_mutex_lock(&nodes.lock);
    struct node *n = node_find(name);
    pthread_mutex_unlock(&nodes.lock);
    if (!n) {
        qmp_fail(r, "DeviceNotFound", "Cannot find device='%s' nor node-name='%s'", name, name);
    }
    return n;
}

/* ---- commands ---- */

static json_object *image_info_json(struct ct_image *img)
{
    json_object *o = json_object_new_object();
    json_object_object_add(o, "filename", json_object_new_string(ct_image_filename(img)));
    json_object_object_add(o, "format", json_object_new_string(ct_image_format(img)));
    json_object_object_add(o, "virtual-size", json_object_new_int64((int64_t)ct_image_size(img)));
    struct ct_image *b = ct_image_backing(img);
    if (b) {
        json_object_object_add(o, "backing-filename", json_object_new_string(ct_image_filename(b)));
        json_object_object_add(o, "backing-image", image_info_json(b));
    }
    return o;
}

static json_object *node_json(struct node *n)
{
    json_object *o = json_object_new_object();
    pthread_mutex_lock(&n->lock);
    json_object_object_add(o, "node-name", json_object_new_string(n->name));
    json_object_object_add(o, "file", json_object_new_string(n->file));
    json_object_object_add(o, "drv", json_object_new_string(n->format));
    json_object_object_add(o, "ro", json_object_new_boolean(!n->writable));
    json_object_object_add(o, "image", image_info_json(n->img));
    struct ct_image *b = ct_image_backing(n->img);
    if (b) {
        json_object_object_add(o, "backing_file", json_object_new_string(ct_image_filename(b)));
    }
    int depth = 0;
    for (struct ct_image *l = b; l; l = ct_image_backing(l)) {
        depth++;
    }
    json_object_object_add(o, "backing_file_depth", json_object_new_int(depth));
    pthread_mutex_unlock(&n->lock);
    return o;
}

static int cmd_query_block(json_object *args, struct qmp_reply *r)
{
    json_object *arr = json_object_new_array();
    pthread_mutex_lock(&nodes.lock);
    for (struct node *n = nodes.head; n; n = n->next) {
        json_object *o = json_object_new_object();
        json_object_object_add(o, "device", json_object_new_string(n->name));
        json_object_object_add(o, "qdev", json_object_new_string(""));
        json_object_object_add(o, "locked", json_object_new_boolean(false));
        json_object_object_add(o, "removable", json_object_new_boolean(false));
        json_object_object_add(o, "inserted", node_json(n));
        json_object_array_add(arr, o);
    }
    pthread_mutex_unlock(&nodes.lock);
    r->ret = arr;
    return 0;
}

static int cmd_query_named_block_nodes(json_object *args, struct qmp_reply *r)
{
    json_object *arr = json_object_new_array();
    pthread_mutex_lock(&nodes.lock);
    for (struct node *n = nodes.head; n; n = n->next) {
        json_object_array_add(arr, node_json(n));
    }
    pthread_mutex_unlock(&nodes.lock);
    r->ret = arr;
    return 0;
}

static int cmd_blockdev_add(json_object *args, struct qmp_reply *r)
{
    /* {driver: qcow2|raw, node-name, file: FILENAME | {driver: file, filename}, read-only} */
    const char *name = qmp_arg_str(args, "node-name"), *driver = qmp_arg_str(args, "driver");
    json_object *f;
    const char *file = NULL;
    if (args && json_object_object_get_ex(args, "file", &f)) {
        file = json_object_get_type(f) == json_type_string ? json_object_get_string(f)
                                                           : qmp_arg_str(f, "filename");
    }
    if (!name || !driver || !file) {
        return qmp_fail(r, "GenericError", "blockdev-add needs driver, node-name and file");
    }
    struct ct_err err = {0};
    if (node_add(name, file, driver, !qmp_arg_bool(args, "read-only", false), &err) < 0) {
        return qmp_fail(r, "GenericError", "%s", err.msg);
    }
    r->ret = json_object_new_object();
    return 0;
}

static int cmd_block_export_add(json_object *args, struct qmp_reply *r)
{
    const char *type = qmp_arg_str(args, "type");
    if (type && strcmp(type, "nbd") != 0) {
        return qmp_fail(r, "GenericError", "export type '%s' is not supported (only nbd)", type);
    }
    struct node *n = qmp_arg_node(args, r);
    if (!n) {
        return -1;
    }
    const char *name = qmp_arg_str(args, "name");
    if (!name) {
        name = n->name;
    }
    struct ct_err err = {0};
    if (node_export(n, name, qmp_arg_bool(args, "writable", false), &err) < 0) {
        return qmp_fail(r, "GenericError", "%s", err.msg);
    }
    const char *id = qmp_arg_str(args, "id");
    if (id) {
        pthread_mutex_lock(&nodes.lock);
        free(n->export_id);
        n->export_id = strdup(id);
        pthread_mutex_unlock(&nodes.lock);
    }
    r->ret = json_object_new_object();
    return 0;
}

static int cmd_block_export_del(json_object *args, struct qmp_reply *r)
{
    const char *id = qmp_arg_str(args, "id"), *mode = qmp_arg_str(args, "mode");
    if (!id) {
        return qmp_fail(r, "GenericError", "Parameter 'id' is missing");
    }
    if (mode && strcmp(mode, "safe") != 0 && strcmp(mode, "hard") != 0) {
        return qmp_fail(r, "GenericError", "Parameter 'mode' does not accept value '%s'", mode);
    }
    struct ct_err err = {0};
    if (node_unexport(id, &err) < 0) {
        return qmp_fail(r, "GenericError", "%s", err.msg);
    }
    r->ret = json_object_new_object();
    json_object *ev = json_object_new_object();
    json_object_object_add(ev, "id", json_object_new_string(id));
    qmp_event("BLOCK_EXPORT_DELETED", ev);
    return 0;
}

static int cmd_blockdev_del(json_object *args, struct qmp_reply *r)
{
    const char *name = qmp_arg_str(args, "node-name");
    if (!name) {
        return qmp_fail(r, "GenericError", "Parameter 'node-name' is missing");
    }
    struct ct_err err = {0};
    if (node_del(name, &err) < 0) {
        return qmp_fail(r, "GenericError", "%s", err.msg);
    }
    r->ret = json_object_new_object();
    return 0;
}

/* External snapshot of one node, with its lock held: the new overlay becomes the top. */
static int snapshot_sync_locked(struct node *n, const char *file, const char *format, bool existing,
                                struct qmp_reply *r, struct ct_image **old_out)
{
    struct ct_err err = {0};
    if (n->busy_job) {
        /* The job holds pointers into this chain and follows its own graph change. */
        return qmp_fail(r, "GenericError",
                        "Node '%s' is busy: block device is in use by block job: %s", n->name,
                        n->busy_job);
    }
    if (ct_image_flush(n->img) < 0) {
        return qmp_fail(r, "GenericError", "flush of '%s' failed before the snapshot", n->name);
    }
    if (!existing) {
        struct ct_create_opts co = {.format = format,
                                    .size = ct_image_size(n->img),
                                    .size_given = true,
                                    .backing_file = n->file,
                                    .backing_format = n->format,
                                    .no_open_backing = true};
        if (ct_image_create(file, &co, &err) < 0) {
            return qmp_fail(r, "GenericError", "%s", err.msg);
        }
    }
    /* The old top must be closed before the overlay opens it read-only as its backing. */
    struct ct_image *old = n->img;
    if (ct_image_close(old, &err) < 0) {
        return qmp_fail(r, "GenericError", "closing '%s' failed: %s", n->file, err.msg);
    }
    struct ct_image *img;
    struct ct_open_opts o = {.format = format, .flags = CT_OPEN_WRITE};
    if (ct_image_open(&img, file, &o, &err) < 0) {
        char msg[sizeof(err.msg)];
        snprintf(msg, sizeof(msg), "%s", err.msg);
        struct ct_open_opts back = {.format = n->format, .flags = CT_OPEN_WRITE};
        if (ct_image_open(&n->img, n->file, &back, &err) < 0) {
            n->img = NULL;
        }
        if (!existing) {
            unlink(file);
        }
        return qmp_fail(r, "GenericError", "%s", msg);
    }
    (void)old_out;
    node_set_image(n, img, file, format);
    return 0;
}

static int cmd_blockdev_snapshot_sync(json_object *args, struct qmp_reply *r)
{
    struct node *n = qmp_arg_node(args, r);
    if (!n) {
        return -1;
    }
    const char *file = qmp_arg_str(args, "snapshot-file");
    const char *format = qmp_arg_str(args, "format");
    const char *mode = qmp_arg_str(args, "mode");
    if (!file) {
        return qmp_fail(r, "GenericError", "Parameter 'snapshot-file' is missing");
    }
    bool existing = mode && strcmp(mode, "existing") == 0;
    pthread_mutex_lock(&n->lock);
    int ret = snapshot_sync_locked(n, file, format ? format : "qcow2", existing, r, NULL);
    pthread_mutex_unlock(&n->lock);
    if (ret == 0) {
        r->ret = json_object_new_object();
    }
    return ret;
}

static int cmd_snapshot_internal(json_object *args, struct qmp_reply *r, bool create)
{
    struct node *n = qmp_arg_node(args, r);
    if (!n) {
        return -1;
    }
    const char *name = qmp_arg_str(args, "name"), *id = qmp_arg_str(args, "id");
    if (!name && !(id && !create)) {
        return qmp_fail(r, "GenericError", "Parameter 'name' is missing");
    }
    if (create && !*name) {
        return qmp_fail(r, "GenericError", "Name is empty");
    }
    struct ct_err err = {0};
    pthread_mutex_lock(&n->lock);
    int ret = 0;
    json_object *info = NULL;
    if (create) {
        ret = ct_snapshot_create(n->img, name, NULL, &err);
    } else {
        int idx = ct_snapshot_find(n->img, name ? name : id, &err);
        struct ct_snapshot_info si;
        if (idx >= 0 && ct_snapshot_get(n->img, (unsigned)idx, &si) == 0) {
            info = json_object_new_object();
            json_object_object_add(info, "id", json_object_new_string(si.id));
            json_object_object_add(info, "name", json_object_new_string(si.name));
            json_object_object_add(info, "vm-state-size",
                                   json_object_new_int64((int64_t)si.vm_state_size));
            json_object_object_add(info, "date-sec", json_object_new_int64(si.date_sec));
            json_object_object_add(info, "date-nsec", json_object_new_int64(si.date_nsec));
            json_object_object_add(info, "vm-clock-sec",
                                   json_object_new_int64((int64_t)(si.vm_clock_nsec / 1000000000)));
            json_object_object_add(info, "vm-clock-nsec",
                                   json_object_new_int64((int64_t)(si.vm_clock_nsec % 1000000000)));
        }
        ret = idx < 0 ? idx : ct_snapshot_delete(n->img, name ? name : id, &err);
    }
    pthread_mutex_unlock(&n->lock);
    if (ret < 0) {
        json_object_put(info);
        return qmp_fail(r, "GenericError", "%s", err.msg);
    }
    r->ret = info ? info : json_object_new_object();
    return 0;
}

static int cmd_snapshot_internal_create(json_object *args, struct qmp_reply *r)
{
    return cmd_snapshot_internal(args, r, true);
}

static int cmd_snapshot_internal_delete(json_object *args, struct qmp_reply *r)
{
    return cmd_snapshot_internal(args, r, false);
}

static int cmd_query_version(json_object *args, struct qmp_reply *r)
{
    json_object *q = json_object_new_object();
    json_object_object_add(q, "major", json_object_new_int(7));
    json_object_object_add(q, "minor", json_object_new_int(2));
    json_object_object_add(q, "micro", json_object_new_int(0));
    json_object *v = json_object_new_object();
    json_object_object_add(v, "qemu", q);
    json_object_object_add(v, "package", json_object_new_string("cowtreed " CT_VERSION_STRING));
    r->ret = v;
    return 0;
}

static int cmd_transaction(json_object *args, struct qmp_reply *r);

static const struct {
    const char *name;
    int (*fn)(json_object *args, struct qmp_reply *r);
} commands[] = {
    {"query-version", cmd_query_version},
    {"query-block", cmd_query_block},
    {"query-named-block-nodes", cmd_query_named_block_nodes},
    {"blockdev-add", cmd_blockdev_add},
    {"block-export-add", cmd_block_export_add},
    {"block-export-del", cmd_block_export_del},
    {"blockdev-del", cmd_blockdev_del},
    {"blockdev-snapshot-sync", cmd_blockdev_snapshot_sync},
    {"blockdev-snapshot-internal-sync", cmd_snapshot_internal_create},
    {"blockdev-snapshot-delete-internal-sync", cmd_snapshot_internal_delete},
    {"transaction", cmd_transaction},
};

/*
 * transaction: every action's node is locked first (in node order, so two transactions never
 * deadlock), so all disks are quiesced together; actions run in order and, on the first
 * failure, the ones already done are undone (external: back to the old top and the new file
 * removed; internal: the snapshot deleted).
 */
static int cmd_transaction(json_object *args, struct qmp_reply *r)
{
    json_object *actions;
    if (!args || !json_object_object_get_ex(args, "actions", &actions) ||
        json_object_get_type(actions) != json_type_array) {
        return qmp_fail(r, "GenericError", "Parameter 'actions' is missing");
    }
    size_t n = json_object_array_length(actions);
    struct node **locked = calloc(n + 1, sizeof(*locked));
    struct {
        struct node *node;
        int kind; /* 1 external, 2 internal */
        char *old_file, *old_format, *new_file, *name;
    } *done = calloc(n + 1, sizeof(*done));
    if (!locked || !done) {
        free(locked);
        free(done);
        return qmp_fail(r, "GenericError", "out of memory");
    }
    size_t nl = 0;
    int ret = 0;
    for (size_t i = 0; i < n && ret == 0; i++) {
        json_object *a = json_object_array_get_idx(actions, i), *data = NULL;
        const char *type = qmp_arg_str(a, "type");
        json_object_object_get_ex(a, "data", &data);
        if (!type) {
            ret = qmp_fail(r, "GenericError", "action %zu has no type", i);
            break;
        }
        if (strcmp(type, "abort") == 0) {
            continue;
        }
        struct node *nd = qmp_arg_node(data, r);
        if (!nd) {
            ret = -1;
            break;
        }
        bool seen = false;
        for (size_t k = 0; k < nl; k++) {
            seen |= locked[k] == nd;
        }
        if (!seen) {
            locked[nl++] = nd;
        }
    }
    /* Lock in address order: a total order shared by all transactions. */
    for (size_t a = 0; a < nl; a++) {
        for (size_t b = a + 1; b < nl; b++) {
            if (locked[b] < locked[a]) {
                struct node *t = locked[a];
                locked[a] = locked[b];
                locked[b] = t;
            }
        }
    }
    for (size_t k = 0; ret == 0 && k < nl; k++) {
        pthread_mutex_lock(&locked[k]->lock);
    }
    size_t nd = 0;
    for (size_t i = 0; i < n && ret == 0; i++) {
        json_object *a = json_object_array_get_idx(actions, i), *data = NULL;
        const char *type = qmp_arg_str(a, "type");
        json_object_object_get_ex(a, "data", &data);
        if (strcmp(type, "abort") == 0) {
            ret = qmp_fail(r, "GenericError", "Transaction aborted using Abort action");
            break;
        }
        struct node *node = qmp_arg_node(data, r);
        if (strcmp(type, "blockdev-snapshot-sync") == 0) {
            const char *file = qmp_arg_str(data, "snapshot-file"),
                       *fmt = qmp_arg_str(data, "format");
            const char *mode = qmp_arg_str(data, "mode");
            if (!file) {
                ret = qmp_fail(r, "GenericError", "Parameter 'snapshot-file' is missing");
                break;
            }
            done[nd].node = node;
            done[nd].kind = 1;
            done[nd].old_file = strdup(node->file);
            done[nd].old_format = strdup(node->format);
            done[nd].new_file = strdup(file);
            ret = snapshot_sync_locked(node, file, fmt ? fmt : "qcow2",
                                       mode && !strcmp(mode, "existing"), r, NULL);
            if (ret == 0) {
                nd++;
            }
        } else if (strcmp(type, "blockdev-snapshot-internal-sync") == 0) {
            const char *name = qmp_arg_str(data, "name");
            struct ct_err err = {0};
            if (!name || !*name) {
                ret = qmp_fail(r, "GenericError", "Name is empty");
                break;
            }
            ret = ct_snapshot_create(node->img, name, NULL, &err);
            if (ret < 0) {
                ret = qmp_fail(r, "GenericError", "%s", err.msg);
                break;
            }
            done[nd].node = node;
            done[nd].kind = 2;
            done[nd].name = strdup(name);
            nd++;
        } else {
            ret = qmp_fail(r, "GenericError", "transaction action '%s' is not supported", type);
        }
    }
    /* Roll back in reverse order. */
    for (size_t k = nd; ret < 0 && k-- > 0;) {
        struct node *node = done[k].node;
        struct ct_err err = {0};
        if (done[k].kind == 2) {
            ct_snapshot_delete(node->img, done[k].name, &err);
        } else {
            ct_image_close(node->img, NULL);
            struct ct_image *img;
            struct ct_open_opts o = {.format = done[k].old_format, .flags = CT_OPEN_WRITE};
            if (ct_image_open(&img, done[k].old_file, &o, &err) == 0) {
                node_set_image(node, img, done[k].old_file, done[k].old_format);
            }
            unlink(done[k].new_file);
        }
    }
    for (size_t k = 0; k < n; k++) {
        free(done[k].old_file);
        free(done[k].old_format);
        free(done[k].new_file);
        free(done[k].name);
    }
    for (size_t k = 0; k < nl; k++) {
        pthread_mutex_unlock(&locked[k]->lock);
    }
    free(locked);
    free(done);
    if (ret == 0) {
        r->ret = json_object_new_object();
    }
    return ret;
}

static void dispatch(struct client *c, json_object *msg, int *quit)
{
    json_object *out = json_object_new_object(), *id = NULL, *args = NULL;
    struct qmp_reply r = {0};
    const char *cmd = qmp_arg_str(msg, "execute");
    json_object_object_get_ex(msg, "id", &id);
    json_object_object_get_ex(msg, "arguments", &args);
    if (!cmd) {
        qmp_fail(&r, "GenericError", "QMP input lacks member 'execute'");
    } else if (!strcmp(cmd, "qmp_capabilities")) {
        if (c->negotiated) {
            qmp_fail(&r, "CommandNotFound",
                     "Capabilities negotiation is already complete, command "
                     "ignored");
        } else {
            c->negotiated = true;
            r.ret = json_object_new_object();
        }
    } else if (!c->negotiated) {
        qmp_fail(&r, "CommandNotFound",
                 "Expecting capabilities negotiation with 'qmp_capabilities'");
    } else if (!strcmp(cmd, "quit")) {
        __atomic_store_n(quit, 1, __ATOMIC_SEQ_CST); /* (read by other threads) */
        r.ret = json_object_new_object();
    } else {
        /* Commands run one at a time, whichever client sends them (as in QEMU's main loop): a
         * command that removes a node never races one that is using it. */
        static pthread_mutex_t command_lock = PTHREAD_MUTEX_INITIALIZER;
        pthread_mutex_lock(&command_lock);
        size_t i;
        for (i = 0; i < sizeof(commands) / sizeof(commands[0]); i++) {
            if (!strcmp(cmd, commands[i].name)) {
                commands[i].fn(args, &r);
                break;
            }
        }
        if (i == sizeof(commands) / sizeof(commands[0]) && !blockjob_dispatch(cmd, args, &r)) {
            qmp_fail(&r, "CommandNotFound", "The command %s has not been found", cmd);
        }
        pthread_mutex_unlock(&command_lock);
    }
    if (r.klass) {
        json_object *e = json_object_new_object();
        json_object_object_add(e, "class", json_object_new_string(r.klass));
        json_object_object_add(e, "desc", json_object_new_string(r.desc));
        json_object_object_add(out, "error", e);
    } else {
        json_object_object_add(out, "return", r.ret ? r.ret : json_object_new_object());
    }
    if (id) {
        json_object_object_add(out, "id", json_object_get(id));
    }
    send_json(c, out);
    json_object_put(out);
}

void qmp_serve(int fd, int *quit)
{
    struct client *c = calloc(1, sizeof(*c));
    if (!c) {
        return;
    }
    c->fd = fd;
    pthread_mutex_init(&c->wlock, NULL);
    pthread_mutex_lock(&clients_lock);
    c->next = clients;
    clients = c;
    pthread_mutex_unlock(&clients_lock);

    json_object *greet = json_object_new_object(), *q = json_object_new_object();
    json_object *v;
    struct qmp_reply vr = {0};
    cmd_query_version(NULL, &vr);
    v = vr.ret;
    json_object_object_add(q, "version", v);
    json_object_object_add(q, "capabilities", json_object_new_array());
    json_object_object_add(greet, "QMP", q);
    send_json(c, greet);
    json_object_put(greet);

    json_tokener *tok = json_tokener_new();
    char buf[4096];
    size_t pending = 0;
    while (!__atomic_load_n(quit, __ATOMIC_SEQ_CST)) {
        ssize_t n = read(fd, buf, sizeof(buf));
        if (n <= 0) {
            break;
        }
        pending += (size_t)n;
        size_t off = 0;
        while (off < (size_t)n) {
            json_object *msg = json_tokener_parse_ex(tok, buf + off, (int)((size_t)n - off));
            enum json_tokener_error jerr = json_tokener_get_error(tok);
            if (jerr == json_tokener_continue) {
                break;
            }
            size_t used = json_tokener_get_parse_end(tok);
            off += used ? used : (size_t)n - off;
            json_tokener_reset(tok);
            pending = 0;
            if (jerr != json_tokener_success || !msg ||
                json_object_get_type(msg) != json_type_object) {
                struct qmp_reply r = {0};
                qmp_fail(&r, "GenericError", "JSON parse error");
                json_object *out = json_object_new_object(), *e = json_object_new_object();
                json_object_object_add(e, "class", json_object_new_string(r.klass));
                json_object_object_add(e, "desc", json_object_new_string(r.desc));
                json_object_object_add(out, "error", e);
                send_json(c, out);
                json_object_put(out);
                json_object_put(msg);
                /* Skip whitespace-only remainders quietly. */
                while (off < (size_t)n && (buf[off] == ' ' || buf[off] == '\n' ||
                                           buf[off] == '\r' || buf[off] == '\t')) {
                    off++;
                }
                continue;
            }
            dispatch(c, msg, quit);
            json_object_put(msg);
            while (off < (size_t)n &&
                   (buf[off] == ' ' || buf[off] == '\n' || buf[off] == '\r' || buf[off] == '\t')) {
                off++;
            }
        }
        if (pending > QMP_MAX_MESSAGE) {
            /* One message larger than the limit: say why, then drop the client (the rest of
             * the message cannot be told from the next one). */
            json_object *out = json_object_new_object(), *e = json_object_new_object();
            json_object_object_add(e, "class", json_object_new_string("GenericError"));
            json_object_object_add(e, "desc",
                                   json_object_new_string("QMP message larger than the limit of "
                                                          "1 MiB (1048576 bytes): closing the "
                                                          "connection"));
            json_object_object_add(out, "error", e);
            send_json(c, out);
            json_object_put(out);
            break;
        }
    }
    json_tokener_free(tok);
    pthread_mutex_lock(&clients_lock);
    for (struct client **pp = &clients; *pp; pp = &(*pp)->next) {
        if (*pp == c) {
            *pp = c->next;
            break;
        }
    }
    pthread_mutex_unlock(&clients_lock);
    pthread_mutex_destroy(&c->wlock);
    free(c);
}
