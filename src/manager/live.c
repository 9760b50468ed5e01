/*
 * Running domains: the daemon (cowtreed, one per catalog home, its own home HOME/run), start,
 * shutdown and state, and the execution of plan steps that go through QMP (ST_LIVE).
 *
 * The truth about "running" (invariant L1). A domain runs when its runstate row says so AND
 * the daemon answers on HOME/run/qmp.sock AND every disk's top (as the catalog has it) is
 * open as a node there. A row saying running without that (the daemon was killed, or
 * restarted without the domain) is a crash: the row becomes shut off / crashed the first
 * time a command sees it, and `start` works again.
 *
 * Nodes are found by file, never by name (L2): cowtreed keeps a node's name when an
 * external snapshot or a pivot changes its image, QEMU moves the name with the old image,
 * so "the node whose image file is the disk's top" is the one both mean.
 *
 * Live steps (L3). A plan of a running domain keeps the offline steps that touch no file the
 * daemon has open (removing unreferenced images, relinking images of other branches) and
 * replaces the others by ST_LIVE steps (a = JSON list of actions):
 *   {"type":"external","top":T,"overlay":O,"format":F}  blockdev-snapshot-sync T -> O
 *   {"type":"internal","image":T,"name":N}             blockdev-snapshot-internal-sync
 *   {"type":"internal-delete","image":T,"name":N}      blockdev-snapshot-delete-internal-sync
 * Creations run as one QMP transaction (all disks or none). Every action checks first
 * whether it is already done (journal J1): a node already on the overlay, a snapshot
 * already present or already gone. When the daemon is gone (it crashed between the journal
 * write and the step), the step is finished offline on the files, as the shut-off domain's
 * plan would have done. Steps that would change a file the daemon has open in any other way
 * are refused: "cannot ... while the domain is running".
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "manager/manager-int.h"
#include "manager/qmp-client.h"
#include "util/err.h"

#define QMP_TIMEOUT_MS 60000

/* ---- the daemon ---- */

static const char *rundir(struct mgr *m)
{
    if (!m->rundir) {
        m->rundir = mgr_xasprintf("%s/run", m->home);
    }
    return m->rundir;
}

static int timeout_ms(struct mgr *m)
{
    return m->opts.qmp_timeout_ms > 0 ? m->opts.qmp_timeout_ms : QMP_TIMEOUT_MS;
}

void live_close(struct mgr *m)
{
    qmp_close(m->qmp);
    m->qmp = NULL;
    free(m->rundir);
    m->rundir = NULL;
}

/* Connect to the daemon if it runs. Returns 1 connected, 0 no daemon, < 0 error. */
int live_connect(struct mgr *m, struct ct_err *err)
{
    if (m->qmp) {
        return 1;
    }
    char *sock = mgr_xasprintf("%s/qmp.sock", rundir(m));
    struct ct_err e2 = {0};
    int r = qmp_connect(&m->qmp, sock, timeout_ms(m), &e2);
    free(sock);
    if (r == -ENOENT || r == -ECONNREFUSED || r == -EPIPE) {
        return 0;
    }
    if (r < 0) {
        if (err) {
            *err = e2;
        }
        return r;
    }
    return 1;
}

/* Drop a broken connection (the daemon died under us). */
static void live_drop(struct mgr *m)
{
    qmp_close(m->qmp);
    m->qmp = NULL;
}

static int spawn_daemon(struct mgr *m, struct ct_err *err)
{
    const char *prog = m->opts.daemon && *m->opts.daemon ? m->opts.daemon : "cowtreed";
    if (mkdir(rundir(m), 0700) < 0 && errno != EEXIST) {
        return ct_err_set(err, -errno, "cannot create '%s': %s", rundir(m), strerror(errno));
    }
    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0) {
        return ct_err_set(err, -errno, "pipe: %s", strerror(errno));
    }
    pid_t pid = fork();
    if (pid < 0) {
        int e = errno;
        close(p[0]);
        close(p[1]);
        return ct_err_set(err, -e, "fork: %s", strerror(e));
    }
    if (pid == 0) {
        int nul = open("/dev/null", O_RDWR);
        if (nul >= 0) {
            dup2(nul, STDIN_FILENO);
            dup2(nul, STDOUT_FILENO);
        }
        dup2(p[1], STDERR_FILENO);
        execlp(prog, prog, "--home", rundir(m), (char *)NULL);
        dprintf(STDERR_FILENO, "cannot run %s: %s", prog, strerror(errno));
        _exit(127);
    }
    close(p[1]);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    char msg[200] = "";
    int fl = fcntl(p[0], F_GETFL);
    fcntl(p[0], F_SETFL, fl | O_NONBLOCK);
    ssize_t n = read(p[0], msg, sizeof(msg) - 1);
    close(p[0]);
    msg[n > 0 ? n : 0] = '\0';
    msg[strcspn(msg, "\n")] = '\0';
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        return ct_err_set(err, -EIO, "cannot start the daemon (%s --home %s): %s", prog, rundir(m),
                          msg[0] ? msg : "it failed");
    }
    return 0;
}

/* Wait (up to timeout) until the daemon of the home has exited. */
static int wait_daemon_gone(struct mgr *m, int tmo_ms, struct ct_err *err)
{
    char *lock = mgr_xasprintf("%s/cowtreed.lock", rundir(m));
    char *pidf = mgr_xasprintf("%s/cowtreed.pid", rundir(m));
    long pid = 0;
    FILE *f = fopen(pidf, "r");
    if (f) {
        if (fscanf(f, "%ld", &pid) != 1) {
            pid = 0;
        }
        fclose(f);
    }
    int r = -ETIMEDOUT;
    for (int waited = 0; waited <= tmo_ms; waited += 10) {
        int fd = open(lock, O_RDWR | O_CLOEXEC);
        if (fd >= 0) {
            int got = flock(fd, LOCK_EX | LOCK_NB);
            close(fd);
            if (got == 0) {
                r = 0;
                break;
            }
        } else if (pid <= 0 || (kill((pid_t)pid, 0) < 0 && errno == ESRCH)) {
            r = 0;
            break;
        }
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    free(lock);
    free(pidf);
    if (r < 0) {
        return ct_err_set(err, r, "the daemon did not exit after quit");
    }
    return 0;
}

/* ---- nodes ---- */

struct live_node {
    char *name, *file, *format;
    bool ro;
    char **chain; /* file, then its backing files */
    size_t nchain;
};

static void nodes_free(struct live_node *v, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free(v[i].name);
        free(v[i].file);
        free(v[i].format);
        mgr_strv_free(v[i].chain, v[i].nchain);
    }
    free(v);
}

/* Every format node of the daemon with its image chain. */
static int live_nodes(struct mgr *m, struct live_node **out, size_t *n, struct ct_err *err)
{
    *out = NULL;
    *n = 0;
    json_object *ret = NULL;
    int r = qmp_execute(m->qmp, "query-named-block-nodes", NULL, &ret, err);
    if (r < 0) {
        if (r == -EPIPE) {
            live_drop(m);
        }
        return r;
    }
    size_t len = json_object_is_type(ret, json_type_array) ? json_object_array_length(ret) : 0;
    for (size_t i = 0; i < len; i++) {
        json_object *o = json_object_array_get_idx(ret, i);
        const char *drv = qmp_str(o, "drv"), *file = qmp_str(o, "file");
        if (!file || mgr_streq(drv, "file") || mgr_streq(drv, "host_device")) {
            continue;
        }
        *out = mgr_xrealloc(*out, (*n + 1) * sizeof(**out));
        struct live_node *ln = &(*out)[(*n)++];
        memset(ln, 0, sizeof(*ln));
        ln->name = mgr_xstrdup(qmp_str(o, "node-name"));
        ln->file = mgr_xstrdup(file);
        ln->format = mgr_xstrdup(drv);
        ln->ro = qmp_bool(o, "ro", false);
        json_object *img = NULL;
        json_object_object_get_ex(o, "image", &img);
        while (img && ln->nchain < 4096) {
            const char *fn = qmp_str(img, "filename");
            if (!fn) {
                break;
            }
            ln->chain = mgr_xrealloc(ln->chain, (ln->nchain + 1) * sizeof(char *));
            ln->chain[ln->nchain++] = mgr_xstrdup(fn);
            json_object *b = NULL;
            img = json_object_object_get_ex(img, "backing-image", &b) ? b : NULL;
        }
        if (ln->nchain == 0) {
            ln->chain = mgr_xcalloc(1, sizeof(char *));
            ln->chain[ln->nchain++] = mgr_xstrdup(file);
        }
    }
    json_object_put(ret);
    return 0;
}

static struct live_node *node_of_file(struct live_node *v, size_t n, const char *file)
{
    struct live_node *ro = NULL;
    for (size_t i = 0; file && i < n; i++) {
        if (strcmp(v[i].file, file) == 0) {
            if (!v[i].ro) {
                return &v[i];
            }
            ro = &v[i];
        }
    }
    return ro;
}

/* Node name for a disk: QEMU wants a letter first and at most 31 characters. */
static char *node_name_for(const char *dom, const char *target)
{
    uint32_t h = 2166136261u;
    for (const char *p = dom; *p; p++) {
        h = (h ^ (uint8_t)*p) * 16777619u;
    }
    char t[16];
    size_t j = 0;
    for (const char *p = target; *p && j < sizeof(t) - 1; p++) {
        char c = *p;
        t[j++] =
            ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')) ? c : '_';
    }
    t[j] = '\0';
    return mgr_xasprintf("ct%08x-%s", h, t);
}

static char *overlay_node_name(const char *file)
{
    uint32_t h = 2166136261u;
    for (const char *p = file; *p; p++) {
        h = (h ^ (uint8_t)*p) * 16777619u;
    }
    return mgr_xasprintf("ov%08x", h);
}

/* ---- runstate ---- */

struct runrow {
    bool present;
    char state[16];
    char reason[16];
    int64_t id;
};

static int runrow_get(struct mgr *m, const char *dom, struct runrow *rr, struct ct_err *err)
{
    memset(rr, 0, sizeof(*rr));
    rr->id = -1;
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(m->db, "SELECT state, reason, id FROM runstate WHERE domain=?", -1, &st,
                           NULL) != SQLITE_OK) {
        return ct_err_set(err, -EIO, "catalog: %s", sqlite3_errmsg(m->db));
    }
    sqlite3_bind_text(st, 1, dom, -1, SQLITE_TRANSIENT);
    if (sqlite3_step(st) == SQLITE_ROW) {
        rr->present = true;
        snprintf(rr->state, sizeof(rr->state), "%s", (const char *)sqlite3_column_text(st, 0));
        const unsigned char *rs = sqlite3_column_text(st, 1);
        snprintf(rr->reason, sizeof(rr->reason), "%s", rs ? (const char *)rs : "unknown");
        rr->id = sqlite3_column_type(st, 2) == SQLITE_NULL ? -1 : sqlite3_column_int64(st, 2);
    }
    sqlite3_finalize(st);
    return 0;
}

static int runrow_set(struct mgr *m, const char *dom, bool running, const char *reason,
                      struct ct_err *err)
{
    char *sql;
    if (running) {
        sql = sqlite3_mprintf(
            "INSERT OR REPLACE INTO runstate(domain, state, reason, id, since) VALUES(%Q, "
            "'running', %Q, (SELECT coalesce(max(id), 0) + 1 FROM runstate), %lld)",
            dom, reason, (long long)time(NULL));
    } else {
        sql = sqlite3_mprintf("INSERT OR REPLACE INTO runstate(domain, state, reason, id, since) "
                              "VALUES(%Q, 'shutoff', %Q, NULL, %lld)",
                              dom, reason, (long long)time(NULL));
    }
    int r = cat_exec_txn(m, sql, err);
    sqlite3_free(sql);
    return r;
}

/* L1: is the domain (catalog model d) running? Updates a stale row to crashed. */
int live_domain_running(struct mgr *m, const struct m_domain *d, bool *running, struct ct_err *err)
{
    *running = false;
    struct runrow rr;
    int r = runrow_get(m, d->name, &rr, err);
    if (r < 0 || !rr.present || strcmp(rr.state, "running") != 0) {
        return r;
    }
    r = live_connect(m, err);
    if (r < 0) {
        return r;
    }
    bool ok = r == 1;
    if (ok) {
        struct live_node *v;
        size_t n;
        r = live_nodes(m, &v, &n, err);
        if (r == -EPIPE) {
            ok = false;
        } else if (r < 0) {
            return r;
        }
        for (size_t i = 0; ok && i < d->nd; i++) {
            ok = node_of_file(v, n, d->disks[i].top) != NULL;
        }
        if (r == 0) {
            nodes_free(v, n);
        }
    }
    if (!ok) {
        return runrow_set(m, d->name, false, "crashed", err);
    }
    *running = true;
    return 0;
}

static int load_dom(struct mgr *m, const char *dom, struct m_cat **cat, struct m_domain **d,
                    struct ct_err *err)
{
    int r = cat_load(m, cat, err);
    if (r < 0) {
        return r;
    }
    *d = m_domain_find(*cat, dom);
    if (!*d) {
        m_cat_free(*cat);
        *cat = NULL;
        return ct_err_set(err, -ENOENT, "Domain not found: no domain with matching name '%s'", dom);
    }
    return 0;
}

int mgr_domstate(struct mgr *m, const char *dom, struct mgr_domstate *st, struct ct_err *err)
{
    struct m_cat *cat;
    struct m_domain *d;
    int r = load_dom(m, dom, &cat, &d, err);
    if (r < 0) {
        return r;
    }
    r = live_fill_state(m, d, st, err);
    m_cat_free(cat);
    return r;
}

int live_fill_state(struct mgr *m, const struct m_domain *d, struct mgr_domstate *st,
                    struct ct_err *err)
{
    bool running;
    int r = live_domain_running(m, d, &running, err);
    if (r < 0) {
        return r;
    }
    struct runrow rr;
    r = runrow_get(m, d->name, &rr, err);
    if (r < 0) {
        return r;
    }
    st->running = running;
    st->state = running ? "running" : "shut off";
    st->id = running ? rr.id : -1;
    if (running) {
        st->reason = "booted";
    } else if (!rr.present) {
        st->reason = "unknown";
    } else if (strcmp(rr.reason, "crashed") == 0) {
        st->reason = "crashed";
    } else if (strcmp(rr.reason, "shutdown") == 0) {
        st->reason = "shutdown";
    } else {
        st->reason = "unknown";
    }
    return 0;
}

bool live_jobs_pending(struct mgr *m, const char *dom)
{
    sqlite3_stmt *st;
    bool any = false;
    if (sqlite3_prepare_v2(m->db, "SELECT count(*) FROM livejobs WHERE domain=?", -1, &st, NULL) ==
        SQLITE_OK) {
        sqlite3_bind_text(st, 1, dom, -1, SQLITE_TRANSIENT);
        any = sqlite3_step(st) == SQLITE_ROW && sqlite3_column_int(st, 0) > 0;
        sqlite3_finalize(st);
    }
    return any;
}

/* ---- start / shutdown ---- */

static int remove_disk_nodes(struct mgr *m, const char *dom, const struct m_domain *d,
                             struct ct_err *err);

/* Open every disk of d in the daemon and export it (*uris: the NBD URIs, owned). */
static int open_domain(struct mgr *m, const struct m_domain *d, char ***uris, size_t *nuris,
                       struct ct_err *err)
{
    const char *dom = d->name;
    int r = 0;
    for (size_t i = 0; i < d->nd && r == 0; i++) {
        const struct m_disk *k = &d->disks[i];
        char *node = node_name_for(dom, k->target);
        json_object *a = json_object_new_object();
        json_object_object_add(a, "driver", json_object_new_string(k->format));
        json_object_object_add(a, "node-name", json_object_new_string(node));
        json_object *f = json_object_new_object();
        json_object_object_add(f, "driver", json_object_new_string("file"));
        json_object_object_add(f, "filename", json_object_new_string(k->top));
        json_object_object_add(a, "file", f);
        json_object_object_add(a, "read-only", json_object_new_boolean(0));
        r = qmp_execute(m->qmp, "blockdev-add", a, NULL, err);
        if (r == 0) {
            char *id = mgr_xasprintf("e%s", node);
            char *name = mgr_xasprintf("%s/%s", dom, k->target);
            a = json_object_new_object();
            json_object_object_add(a, "type", json_object_new_string("nbd"));
            json_object_object_add(a, "id", json_object_new_string(id));
            json_object_object_add(a, "node-name", json_object_new_string(node));
            json_object_object_add(a, "name", json_object_new_string(name));
            json_object_object_add(a, "writable", json_object_new_boolean(1));
            r = qmp_execute(m->qmp, "block-export-add", a, NULL, err);
            if (r == 0) {
                *uris = mgr_xrealloc(*uris, (*nuris + 1) * sizeof(char *));
                (*uris)[(*nuris)++] =
                    mgr_xasprintf("nbd+unix:///%s?socket=%s/nbd.sock", name, rundir(m));
            }
            free(id);
            free(name);
        }
        if (r < 0) {
            ct_err_prefix(err, "disk %s: ", k->target);
        }
        free(node);
    }
    return r;
}

int mgr_start(struct mgr *m, const char *dom, char ***uris, size_t *nuris, struct ct_err *err)
{
    *uris = NULL;
    *nuris = 0;
    struct m_ctx x;
    ctx_init(&x, m);
    struct m_domain *d;
    int r = load_dom(m, dom, &x.cat, &d, err);
    if (r < 0) {
        goto out;
    }
    bool running;
    r = live_domain_running(m, d, &running, err);
    if (r == 0 && running) {
        r = ct_err_set(err, -CT_E_BUSY,
                       "Requested operation is not valid: domain '%s' is already active", dom);
    }
    if (r == 0 && live_jobs_pending(m, dom)) {
        /* A job row of a crashed run: the daemon lost it; forget it. */
        char *sql = sqlite3_mprintf("DELETE FROM livejobs WHERE domain=%Q", dom);
        r = cat_exec(m, sql, err);
        sqlite3_free(sql);
    }
    if (r == 0) {
        r = ctx_verify_domain(&x, d, err);
    }
    if (r < 0) {
        goto out;
    }
    r = live_connect(m, err);
    if (r == 0) {
        r = spawn_daemon(m, err);
        if (r == 0) {
            r = live_connect(m, err);
            if (r == 0) {
                r = ct_err_set(err, -EIO, "the daemon started but does not answer on %s/qmp.sock",
                               rundir(m));
            }
        }
    }
    if (r < 0) {
        goto out;
    }
    r = open_domain(m, d, uris, nuris, err);
    if (r < 0) {
        /* Undo: close what was opened (or stop the daemon if nothing else runs). */
        struct ct_err e2 = {0};
        (void)remove_disk_nodes(m, dom, d, &e2);
        mgr_strv_free(*uris, *nuris);
        *uris = NULL;
        *nuris = 0;
        goto out;
    }
    r = runrow_set(m, dom, true, "booted", err);
out:
    ctx_fini(&x);
    return r;
}

/* Is any other domain running? */
static int others_running(struct mgr *m, const char *dom, bool *any, struct ct_err *err)
{
    *any = false;
    struct m_cat *cat;
    int r = cat_load(m, &cat, err);
    for (size_t i = 0; r == 0 && i < cat->nd && !*any; i++) {
        if (strcmp(cat->doms[i]->name, dom) != 0) {
            r = live_domain_running(m, cat->doms[i], any, err);
        }
    }
    if (cat) {
        m_cat_free(cat);
    }
    return r;
}

static int quit_daemon(struct mgr *m, struct ct_err *err)
{
    int r = qmp_execute(m->qmp, "quit", NULL, NULL, err);
    live_drop(m);
    if (r < 0 && r != -EPIPE) {
        return r;
    }
    return wait_daemon_gone(m, timeout_ms(m), err);
}

/* Close the domain's nodes: exports and nodes deleted, or the whole daemon stopped when no
 * other domain runs (quit flushes and closes every image). */
/* The daemon cannot close one domain's nodes (no block-export-del / blockdev-del): stop it
 * (every image flushed and closed) and start it again with the other running domains' disks
 * (their NBD clients reconnect to the same URIs). */
static int restart_without(struct mgr *m, const char *dom, struct ct_err *err)
{
    struct m_cat *cat;
    int r = cat_load(m, &cat, err);
    if (r < 0) {
        return r;
    }
    const struct m_domain **keep = mgr_xcalloc(cat->nd + 1, sizeof(*keep));
    size_t nk = 0;
    for (size_t i = 0; r == 0 && i < cat->nd; i++) {
        bool running = false;
        if (strcmp(cat->doms[i]->name, dom) != 0) {
            r = live_domain_running(m, cat->doms[i], &running, err);
        }
        if (running) {
            keep[nk++] = cat->doms[i];
        }
    }
    if (r == 0) {
        r = quit_daemon(m, err);
    }
    if (r == 0) {
        r = spawn_daemon(m, err);
    }
    if (r == 0) {
        r = live_connect(m, err);
        if (r == 0) {
            r = ct_err_set(err, -EIO, "the restarted daemon does not answer");
        }
        r = r > 0 ? 0 : r;
    }
    for (size_t i = 0; r == 0 && i < nk; i++) {
        char **u = NULL;
        size_t nu = 0;
        r = open_domain(m, keep[i], &u, &nu, err);
        mgr_strv_free(u, nu);
        if (r < 0) {
            ct_err_prefix(err, "reopening domain %s in the restarted daemon: ", keep[i]->name);
        }
    }
    free(keep);
    m_cat_free(cat);
    return r;
}

static int remove_disk_nodes(struct mgr *m, const char *dom, const struct m_domain *d,
                             struct ct_err *err)
{
    bool others;
    int r = others_running(m, dom, &others, err);
    if (r < 0) {
        return r;
    }
    if (!others) {
        return m->qmp ? quit_daemon(m, err) : 0;
    }
    struct live_node *v = NULL;
    size_t n = 0;
    r = live_nodes(m, &v, &n, err);
    for (size_t i = 0; r == 0 && i < d->nd; i++) {
        char *node = node_name_for(dom, d->disks[i].target);
        char *id = mgr_xasprintf("e%s", node);
        json_object *a = json_object_new_object();
        json_object_object_add(a, "id", json_object_new_string(id));
        r = qmp_execute(m->qmp, "block-export-del", a, NULL, err);
        if (r == -ENODEV || (r == -EIO && strstr(err->msg, "not found"))) {
            r = 0;
        }
        struct live_node *ln = node_of_file(v, n, d->disks[i].top);
        if (r == 0 && ln) {
            a = json_object_new_object();
            json_object_object_add(a, "node-name", json_object_new_string(ln->name));
            r = qmp_execute(m->qmp, "blockdev-del", a, NULL, err);
        }
        free(id);
        free(node);
    }
    nodes_free(v, n);
    if (r == -ENOTSUP) {
        r = restart_without(m, dom, err);
    }
    return r;
}

int mgr_shutdown(struct mgr *m, const char *dom, struct ct_err *err)
{
    struct m_cat *cat;
    struct m_domain *d;
    int r = load_dom(m, dom, &cat, &d, err);
    if (r < 0) {
        return r;
    }
    bool running;
    r = live_domain_running(m, d, &running, err);
    if (r == 0 && !running) {
        r = ct_err_set(err, -CT_E_BUSY,
                       "Requested operation is not valid: domain '%s' is not running", dom);
    }
    if (r == 0 && live_jobs_pending(m, dom)) {
        r = ct_err_set(err, -CT_E_BUSY,
                       "domain '%s' has an active block job (finish it with blockjob --pivot "
                       "or --abort first)",
                       dom);
    }
    if (r == 0) {
        r = remove_disk_nodes(m, dom, d, err);
    }
    if (r == 0) {
        r = runrow_set(m, dom, false, "shutdown", err);
    }
    m_cat_free(cat);
    return r;
}

/* ---- live plans (L3) ---- */

static bool in_list(char **v, size_t n, const char *s)
{
    for (size_t i = 0; s && i < n; i++) {
        if (strcmp(v[i], s) == 0) {
            return true;
        }
    }
    return false;
}

int live_ctx_enter(struct m_ctx *x, struct m_domain *d, struct ct_err *err)
{
    struct live_node *v;
    size_t n;
    int r = live_nodes(x->m, &v, &n, err);
    if (r < 0) {
        return r;
    }
    x->live = true;
    x->live_dom = mgr_xstrdup(d->name);
    x->nlive_tops = d->nd;
    x->live_tops = mgr_xcalloc(d->nd + 1, sizeof(char *));
    for (size_t i = 0; i < d->nd; i++) {
        x->live_tops[i] = mgr_xstrdup(d->disks[i].top);
    }
    for (size_t i = 0; i < n; i++) {
        for (size_t j = 0; j < v[i].nchain; j++) {
            if (!in_list(x->inuse, x->ninuse, v[i].chain[j])) {
                x->inuse = mgr_xrealloc(x->inuse, (x->ninuse + 1) * sizeof(char *));
                x->inuse[x->ninuse++] = mgr_xstrdup(v[i].chain[j]);
            }
        }
    }
    nodes_free(v, n);
    m_probe_set_force_share(true);
    return 0;
}

static bool is_live_top(struct m_ctx *x, const char *path)
{
    return in_list(x->live_tops, x->nlive_tops, path);
}

static int refuse(struct m_ctx *x, const char *what, const char *path, struct ct_err *err)
{
    return ct_err_set(err, -CT_E_BUSY,
                      "cannot %s while domain %s is running: it would %s '%s', which the daemon "
                      "has open (shut the domain down first)",
                      x->plan && x->plan->op ? x->plan->op : "do this", x->live_dom, what, path);
}

static void steps_push(struct m_step **v, size_t *n, const struct m_step *s)
{
    *v = mgr_xrealloc(*v, (*n + 1) * sizeof(**v));
    (*v)[(*n)++] = *s;
}

static void step_clear(struct m_step *s)
{
    free(s->a);
    free(s->b);
    free(s->c);
    free(s->d);
    free(s->e);
}

static struct m_step live_step(json_object *actions, bool irreversible, const char *summary)
{
    struct m_step s = {.kind = ST_LIVE, .n = irreversible ? 1 : 0};
    s.a = mgr_xstrdup(json_object_to_json_string_ext(actions, JSON_C_TO_STRING_PLAIN |
                                                                  JSON_C_TO_STRING_NOSLASHESCAPE));
    s.b = mgr_xstrdup(summary);
    return s;
}

int live_plan(struct m_ctx *x, struct ct_err *err)
{
    struct m_domain *d = m_domain_find(x->cat, x->live_dom);
    struct mgr_plan *p = x->plan;
    if (p->ns > 0 && live_jobs_pending(x->m, x->live_dom)) {
        return ct_err_set(err, -CT_E_BUSY,
                          "cannot %s: domain %s has an active block job (see `cowtree blockjob`; "
                          "end it with --pivot or --abort first)",
                          p->op ? p->op : "do this", x->live_dom);
    }
    json_object *create = json_object_new_array();
    char **absorbed = NULL; /* overlays the daemon creates */
    size_t nabsorbed = 0;
    int r = 0;
    /* Tops that change: only to an overlay on the old top (an external snapshot). */
    for (size_t i = 0; d && i < d->nd && i < x->nlive_tops && r == 0; i++) {
        const char *before = x->live_tops[i], *after = d->disks[i].top;
        if (strcmp(before, after) == 0) {
            continue;
        }
        bool committed = false; /* an active commit of before into after pivots the disk */
        for (size_t j = 0; j < p->ns; j++) {
            committed |= p->steps[j].kind == ST_COMMIT && mgr_streq(p->steps[j].a, before) &&
                         mgr_streq(p->steps[j].b, after);
        }
        if (committed) {
            continue;
        }
        struct m_image *im = m_image_find(x->cat, after);
        if (!im || !mgr_streq(im->backing, before)) {
            r = ct_err_set(err, -CT_E_BUSY,
                           "cannot %s while domain %s is running: disk %s would leave its active "
                           "image '%s' for '%s' (only an external snapshot can switch a running "
                           "disk; shut the domain down first)",
                           p->op, x->live_dom, d->disks[i].target, before, after);
            break;
        }
        bool created = false;
        for (size_t j = 0; j < p->ns; j++) {
            created |= p->steps[j].kind == ST_CREATE_OVERLAY && mgr_streq(p->steps[j].a, after);
        }
        json_object *a = json_object_new_object();
        json_object_object_add(a, "type", json_object_new_string("external"));
        json_object_object_add(a, "top", json_object_new_string(before));
        json_object_object_add(a, "overlay", json_object_new_string(after));
        json_object_object_add(a, "format", json_object_new_string(im->format));
        json_object_object_add(a, "backing-format", json_object_new_string(im->backing_fmt));
        json_object_object_add(a, "existing", json_object_new_boolean(!created));
        json_object_array_add(create, a);
        absorbed = mgr_xrealloc(absorbed, (nabsorbed + 1) * sizeof(char *));
        absorbed[nabsorbed++] = mgr_xstrdup(after);
    }
    /* Images a live commit takes out of the daemon's chain: removable and relinked by it. */
    char **leaving = NULL;
    size_t nleaving = 0;
    for (size_t i = 0; i < p->ns; i++) {
        if (p->steps[i].kind == ST_COMMIT && in_list(x->inuse, x->ninuse, p->steps[i].a)) {
            leaving = mgr_xrealloc(leaving, (nleaving + 1) * sizeof(char *));
            leaving[nleaving++] = mgr_xstrdup(p->steps[i].a);
        }
    }
    struct m_step *out = NULL;
    size_t nout = 0;
    ssize_t create_at = json_object_array_length(create) ? 0 : -1;
    bool create_placed = false;
    for (size_t i = 0; i < p->ns && r == 0; i++) {
        struct m_step *s = &p->steps[i];
        bool keep = true;
        switch (s->kind) {
        case ST_CREATE_OVERLAY:
            if (in_list(absorbed, nabsorbed, s->a)) {
                keep = false;
                if (!create_placed) {
                    create_at = (ssize_t)nout;
                    create_placed = true;
                }
            } else if (in_list(x->inuse, x->ninuse, s->a)) {
                r = refuse(x, "recreate", s->a, err);
            }
            break;
        case ST_INTERNAL_CREATE:
        case ST_INTERNAL_DELETE:
            if (is_live_top(x, s->a)) {
                json_object *a = json_object_new_object();
                json_object_object_add(a, "type",
                                       json_object_new_string(s->kind == ST_INTERNAL_CREATE
                                                                  ? "internal"
                                                                  : "internal-delete"));
                json_object_object_add(a, "image", json_object_new_string(s->a));
                json_object_object_add(a, "name", json_object_new_string(s->b));
                json_object_object_add(a, "format", json_object_new_string(s->c));
                json_object_object_add(a, "date", json_object_new_int64(s->n));
                keep = false;
                if (s->kind == ST_INTERNAL_CREATE) {
                    json_object_array_add(create, a);
                    if (!create_placed) {
                        create_at = (ssize_t)nout;
                        create_placed = true;
                    }
                } else {
                    json_object *one = json_object_new_array();
                    json_object_array_add(one, a);
                    struct m_step ls = live_step(one, true, s->a);
                    json_object_put(one);
                    steps_push(&out, &nout, &ls);
                }
            } else if (in_list(x->inuse, x->ninuse, s->a)) {
                r = refuse(x, "change the internal snapshots of", s->a, err);
            }
            break;
        case ST_REBASE:
            if (in_list(x->inuse, x->ninuse, s->a) && in_list(leaving, nleaving, s->d)) {
                keep = false; /* the daemon's commit relinks the image above its top */
            } else if (in_list(x->inuse, x->ninuse, s->a)) {
                r = refuse(x, "rewrite", s->a, err);
            }
            break;
        case ST_REMOVE:
            if (in_list(x->inuse, x->ninuse, s->a) && !in_list(leaving, nleaving, s->a)) {
                r = refuse(x, "remove", s->a, err);
            }
            break;
        case ST_INTERNAL_APPLY:
        case ST_PULL:
            if (in_list(x->inuse, x->ninuse, s->a)) {
                r = refuse(x, "rewrite", s->a, err);
            }
            break;
        case ST_COMMIT:
            if (in_list(x->inuse, x->ninuse, s->a)) {
                /* A layer of the daemon's chain: a live block-commit, run to its end. */
                json_object *a = json_object_new_object();
                json_object_object_add(a, "top", json_object_new_string(s->a));
                json_object_object_add(a, "base", json_object_new_string(s->b));
                json_object_object_add(a, "base-format", json_object_new_string(s->c));
                json_object_object_add(a, "top-format", json_object_new_string(s->d));
                json_object_object_add(a, "active", json_object_new_boolean(is_live_top(x, s->a)));
                struct m_step ls = live_step(a, true, s->a);
                json_object_put(a);
                ls.c = mgr_xstrdup("commit");
                steps_push(&out, &nout, &ls);
                keep = false;
            } else if (in_list(x->inuse, x->ninuse, s->b)) {
                r = refuse(x, "commit into", s->b, err);
            }
            break;
        case ST_MATERIALIZE:
        case ST_COPY:
            if (is_live_top(x, s->kind == ST_COPY ? s->a : s->b)) {
                r = refuse(x, "read", s->kind == ST_COPY ? s->a : s->b, err);
            }
            break;
        default:
            break;
        }
        if (r == 0 && keep) {
            steps_push(&out, &nout, s);
            memset(s, 0, sizeof(*s));
        }
    }
    if (r == 0 && create_at >= 0) {
        struct m_step ls = live_step(create, false, NULL);
        steps_push(&out, &nout, &ls);
        memmove(&out[create_at + 1], &out[create_at],
                (nout - 1 - (size_t)create_at) * sizeof(*out));
        out[create_at] = ls;
    }
    json_object_put(create);
    mgr_strv_free(absorbed, nabsorbed);
    mgr_strv_free(leaving, nleaving);
    if (r < 0) {
        for (size_t i = 0; i < nout; i++) {
            /* steps moved to out were zeroed in p: put them back for p's free */
            step_clear(&out[i]);
        }
        free(out);
        return r;
    }
    for (size_t i = 0; i < p->ns; i++) {
        step_clear(&p->steps[i]);
    }
    free(p->steps);
    p->steps = out;
    p->ns = nout;
    return 0;
}

/* ---- live steps ---- */

static bool has_internal(const char *path, const char *name)
{
    struct ct_image *img = NULL;
    struct ct_open_opts o = {.format = "qcow2", .flags = CT_OPEN_NO_BACKING | CT_OPEN_FORCE_SHARE};
    if (ct_image_open(&img, path, &o, NULL) < 0) {
        return false;
    }
    bool found = ct_snapshot_find(img, name, NULL) >= 0;
    ct_image_close(img, NULL);
    return found;
}

/* Is path a qcow2 image whose backing file is backing? */
static bool overlay_ok(const char *path, const char *backing)
{
    struct m_probe pr;
    struct ct_err e = {0};
    if (!mgr_file_exists(path) || m_read_image(path, "qcow2", &pr, &e) < 0) {
        return false;
    }
    bool ok = mgr_streq(pr.backing, backing);
    free(pr.path);
    free(pr.format);
    free(pr.backing);
    free(pr.backing_fmt);
    mgr_strv_free(pr.snaps, pr.nsnaps);
    return ok;
}

/* The daemon is gone: finish the actions on the files, as a shut-off domain's plan does. */
static int offline_actions(struct mgr *m, json_object *acts, bool undo, struct ct_err *err)
{
    int r = 0;
    size_t n = json_object_array_length(acts);
    for (size_t i = 0; i < n && r == 0; i++) {
        json_object *a = json_object_array_get_idx(acts, i);
        const char *type = qmp_str(a, "type");
        struct m_step s = {0};
        if (mgr_streq(type, "external")) {
            const char *ov = qmp_str(a, "overlay"), *top = qmp_str(a, "top");
            if (undo) {
                continue; /* the file may hold writes the daemon made: keep it */
            }
            if (qmp_bool(a, "existing", false) || overlay_ok(ov, top)) {
                continue;
            }
            s.kind = ST_CREATE_OVERLAY;
            s.a = (char *)ov;
            s.b = (char *)top;
            s.c = (char *)qmp_str(a, "backing-format");
        } else {
            bool create = mgr_streq(type, "internal");
            s.kind = create != undo ? ST_INTERNAL_CREATE : ST_INTERNAL_DELETE;
            s.a = (char *)qmp_str(a, "image");
            s.b = (char *)qmp_str(a, "name");
            s.c = (char *)qmp_str(a, "format");
            s.n = qmp_int(a, "date", 0);
        }
        r = journal_step_do(m, &s, err);
    }
    return r;
}

static int run_actions(struct mgr *m, const struct m_step *st, bool undo, struct ct_err *err)
{
    json_object *acts = json_tokener_parse(st->a);
    if (!acts || !json_object_is_type(acts, json_type_array)) {
        json_object_put(acts);
        return ct_err_set(err, -CT_E_CORRUPT, "journal: malformed live step");
    }
    int r = live_connect(m, err);
    if (r == 0) {
        r = offline_actions(m, acts, undo, err);
        json_object_put(acts);
        return r;
    }
    if (r < 0) {
        json_object_put(acts);
        return r;
    }
    struct live_node *v = NULL;
    size_t n = 0;
    r = live_nodes(m, &v, &n, err);
    if (r == -EPIPE) {
        r = offline_actions(m, acts, undo, err);
        json_object_put(acts);
        return r;
    }
    json_object *txn = json_object_new_array();
    size_t len = r == 0 ? json_object_array_length(acts) : 0;
    for (size_t i = 0; i < len && r == 0; i++) {
        json_object *a = json_object_array_get_idx(acts, i);
        const char *type = qmp_str(a, "type");
        bool external = mgr_streq(type, "external");
        const char *file = external ? qmp_str(a, "top") : qmp_str(a, "image");
        struct live_node *ln = node_of_file(v, n, file);
        if (external) {
            const char *ov = qmp_str(a, "overlay");
            bool done = node_of_file(v, n, ov) != NULL;
            if (undo) {
                if (done) {
                    r = ct_err_set(err, -CT_E_BUSY, "'%s' is the daemon's active image now", ov);
                } else if (!qmp_bool(a, "existing", false)) {
                    r = mgr_unlink(ov, err);
                }
                continue;
            }
            if (done) {
                continue;
            }
            if (!ln) {
                r = ct_err_set(err, -ENODEV, "'%s' is not open in the daemon", file);
                break;
            }
            json_object *data = json_object_new_object();
            json_object_object_add(data, "node-name", json_object_new_string(ln->name));
            json_object_object_add(data, "snapshot-file", json_object_new_string(ov));
            /* QEMU names the new node (the export moves onto it); cowtreed keeps the node. */
            char *sn = overlay_node_name(ov);
            json_object_object_add(data, "snapshot-node-name", json_object_new_string(sn));
            free(sn);
            json_object_object_add(data, "format", json_object_new_string(qmp_str(a, "format")));
            json_object_object_add(data, "mode",
                                   json_object_new_string(qmp_bool(a, "existing", false)
                                                              ? "existing"
                                                              : "absolute-paths"));
            json_object *t = json_object_new_object();
            json_object_object_add(t, "type", json_object_new_string("blockdev-snapshot-sync"));
            json_object_object_add(t, "data", data);
            json_object_array_add(txn, t);
            continue;
        }
        const char *name = qmp_str(a, "name");
        bool create = mgr_streq(type, "internal") != undo;
        bool present = has_internal(file, name);
        if (present == create) {
            continue; /* already done (J1) */
        }
        if (!ln) {
            r = ct_err_set(err, -ENODEV, "'%s' is not open in the daemon", file);
            break;
        }
        json_object *data = json_object_new_object();
        json_object_object_add(data, "device", json_object_new_string(ln->name));
        json_object_object_add(data, "name", json_object_new_string(name));
        if (create) {
            json_object *t = json_object_new_object();
            json_object_object_add(t, "type",
                                   json_object_new_string("blockdev-snapshot-internal-sync"));
            json_object_object_add(t, "data", data);
            json_object_array_add(txn, t);
        } else {
            r = qmp_execute(m->qmp, "blockdev-snapshot-delete-internal-sync", data, NULL, err);
        }
    }
    if (r == 0 && json_object_array_length(txn) > 0) {
        json_object *args = json_object_new_object();
        json_object_object_add(args, "actions", json_object_get(txn));
        r = qmp_execute(m->qmp, "transaction", args, NULL, err);
        for (size_t i = 0; r == 0 && i < len; i++) {
            json_object *a = json_object_array_get_idx(acts, i);
            if (mgr_streq(qmp_str(a, "type"), "external")) {
                (void)chmod(qmp_str(a, "overlay"), 0600); /* CVE-2025-13193 */
            }
        }
    }
    json_object_put(txn);
    json_object_put(acts);
    nodes_free(v, n);
    return r;
}

static int live_commit_step(struct mgr *m, const struct m_step *s, struct ct_err *err);

int live_step_do(struct mgr *m, const struct m_step *s, struct ct_err *err)
{
    if (s->c && strcmp(s->c, "job") == 0) {
        return live_job_step(m, s, err);
    }
    if (s->c && strcmp(s->c, "commit") == 0) {
        return live_commit_step(m, s, err);
    }
    return run_actions(m, s, false, err);
}

int live_step_undo(struct mgr *m, const struct m_step *s, struct ct_err *err)
{
    if (s->c && (strcmp(s->c, "job") == 0 || strcmp(s->c, "commit") == 0)) {
        return 0;
    }
    return run_actions(m, s, true, err);
}

/* ---- live block jobs ----
 *
 * A job is started by a journaled plan: [ST_LIVE "job" step (the QMP command; already done
 * when the daemon lists the job id), catalog step (snapshots the job invalidates, and the
 * livejobs row)]. The job runs in the daemon with auto-dismiss off, so its end (and error)
 * stays visible until a cowtree command sees it: the one that waits, `blockjob`, or any
 * later command (mgr_open -> live_jobs_sync). Its end is recorded by planning the same
 * operation again as the offline verb would (MGR_LIVE_DONE), minus the steps whose work the
 * job did: the catalog change, removals (--delete) and the livejobs row deletion commit in
 * one journaled plan. An aborted or failed job only loses its row (the invalidations made at
 * its start stay true: a commit writes into its base from its first byte).
 */

struct jobrow {
    char *dom, *target, *job, *type;
    json_object *args;
};

static void jobrow_fini(struct jobrow *jr)
{
    free(jr->dom);
    free(jr->target);
    free(jr->job);
    free(jr->type);
    json_object_put(jr->args);
    memset(jr, 0, sizeof(*jr));
}

static int jobrows(struct mgr *m, const char *dom, const char *target, struct jobrow **v, size_t *n,
                   struct ct_err *err)
{
    *v = NULL;
    *n = 0;
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(m->db,
                           "SELECT domain, target, job, type, args FROM livejobs WHERE "
                           "(?1 IS NULL OR domain=?1) AND (?2 IS NULL OR target=?2)",
                           -1, &st, NULL) != SQLITE_OK) {
        return ct_err_set(err, -EIO, "catalog: %s", sqlite3_errmsg(m->db));
    }
    if (dom) {
        sqlite3_bind_text(st, 1, dom, -1, SQLITE_TRANSIENT);
    }
    if (target) {
        sqlite3_bind_text(st, 2, target, -1, SQLITE_TRANSIENT);
    }
    while (sqlite3_step(st) == SQLITE_ROW) {
        *v = mgr_xrealloc(*v, (*n + 1) * sizeof(**v));
        struct jobrow *jr = &(*v)[(*n)++];
        jr->dom = mgr_xstrdup((const char *)sqlite3_column_text(st, 0));
        jr->target = mgr_xstrdup((const char *)sqlite3_column_text(st, 1));
        jr->job = mgr_xstrdup((const char *)sqlite3_column_text(st, 2));
        jr->type = mgr_xstrdup((const char *)sqlite3_column_text(st, 3));
        jr->args = json_tokener_parse((const char *)sqlite3_column_text(st, 4));
        if (!jr->args) {
            jr->args = json_object_new_object();
        }
    }
    sqlite3_finalize(st);
    return 0;
}

static void jobrows_free(struct jobrow *v, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        jobrow_fini(&v[i]);
    }
    free(v);
}

static int jobrow_find(struct mgr *m, const char *dom, const char *target, struct jobrow *out,
                       bool *found, struct ct_err *err)
{
    struct jobrow *v;
    size_t n;
    *found = false;
    memset(out, 0, sizeof(*out));
    int r = jobrows(m, dom, target, &v, &n, err);
    if (r == 0 && n > 0) {
        *out = v[0];
        memset(&v[0], 0, sizeof(v[0]));
        *found = true;
    }
    jobrows_free(v, n);
    return r;
}

static int jobrow_note(struct mgr *m, struct jobrow *jr, const char *key, const char *val,
                       struct ct_err *err)
{
    json_object_object_add(jr->args, key, json_object_new_string(val));
    char *sql = sqlite3_mprintf("UPDATE livejobs SET args=%Q WHERE domain=%Q AND target=%Q",
                                json_object_to_json_string_ext(jr->args, JSON_C_TO_STRING_PLAIN),
                                jr->dom, jr->target);
    int r = cat_exec(m, sql, err);
    sqlite3_free(sql);
    return r;
}

static char *jobrow_delete_sql(const struct jobrow *jr)
{
    char *q =
        sqlite3_mprintf("DELETE FROM livejobs WHERE domain=%Q AND target=%Q;", jr->dom, jr->target);
    char *s = mgr_xstrdup(q);
    sqlite3_free(q);
    return s;
}

static const char *job_what(const char *type)
{
    return mgr_streq(type, "pull") ? "pull" : mgr_streq(type, "copy") ? "copy" : "commit";
}

/* The job as query-block-jobs shows it; *found false when the daemon does not list it. */
static int job_query(struct mgr *m, const char *id, struct mgr_jobinfo *ji, char **error,
                     struct ct_err *err)
{
    memset(ji, 0, sizeof(*ji));
    if (error) {
        *error = NULL;
    }
    json_object *ret = NULL;
    int r = qmp_execute(m->qmp, "query-block-jobs", NULL, &ret, err);
    if (r < 0) {
        if (r == -EPIPE) {
            live_drop(m);
        }
        return r;
    }
    size_t len = json_object_is_type(ret, json_type_array) ? json_object_array_length(ret) : 0;
    for (size_t i = 0; i < len; i++) {
        json_object *o = json_object_array_get_idx(ret, i);
        if (!mgr_streq(qmp_str(o, "device"), id)) {
            continue;
        }
        ji->exists = true;
        snprintf(ji->type, sizeof(ji->type), "%s", qmp_str(o, "type") ? qmp_str(o, "type") : "");
        snprintf(ji->status, sizeof(ji->status), "%s",
                 qmp_str(o, "status") ? qmp_str(o, "status") : "running");
        ji->offset = (uint64_t)qmp_int(o, "offset", 0);
        ji->len = (uint64_t)qmp_int(o, "len", 0);
        ji->speed = (uint64_t)qmp_int(o, "speed", 0);
        ji->ready = qmp_bool(o, "ready", false);
        if (error && qmp_str(o, "error")) {
            *error = mgr_xstrdup(qmp_str(o, "error"));
        }
    }
    json_object_put(ret);
    return 0;
}

enum outcome { OUT_SUCCESS, OUT_ABORTED, OUT_FAILED };

static char *done_sql; /* the livejobs row deletion for live_job_done_finish */

/* Record the end of the job (see the section comment). */
static int conclude(struct mgr *m, struct jobrow *jr, enum outcome oc, const char *why,
                    struct ct_err *err)
{
    if (oc != OUT_SUCCESS) {
        char *sql = jobrow_delete_sql(jr);
        int r = cat_exec_txn(m, sql, err);
        free(sql);
        if (r == 0 && oc == OUT_FAILED && mgr_streq(jr->type, "copy") &&
            !qmp_bool(jr->args, "reuse", false) && qmp_str(jr->args, "dest")) {
            (void)mgr_unlink(qmp_str(jr->args, "dest"), NULL); /* a partial copy we made */
        }
        if (r == 0 && oc == OUT_FAILED) {
            r = ct_err_set(err, -EIO, "block %s job on disk %s failed: %s", job_what(jr->type),
                           jr->target, why ? why : "unknown error");
        }
        return r;
    }
    struct mgr_block_opts o = {
        .base = qmp_str(jr->args, "base"),
        .top = qmp_str(jr->args, "top"),
        .shallow = qmp_bool(jr->args, "shallow", false),
        .delete_layers = qmp_bool(jr->args, "delete", false),
        .force = true,
        .dest = qmp_str(jr->args, "dest"),
        .format = qmp_str(jr->args, "format"),
        .reuse_external = qmp_bool(jr->args, "reuse", false),
        .pivot = true,
    };
    done_sql = jobrow_delete_sql(jr);
    int r;
    if (mgr_streq(jr->type, "pull")) {
        r = mgr_blockpull(m, jr->dom, jr->target, &o, MGR_LIVE_DONE, NULL, err);
    } else if (mgr_streq(jr->type, "copy")) {
        r = mgr_blockcopy(m, jr->dom, jr->target, &o, MGR_LIVE_DONE, NULL, err);
    } else {
        r = mgr_blockcommit(m, jr->dom, jr->target, &o, MGR_LIVE_DONE, NULL, err);
    }
    free(done_sql);
    done_sql = NULL;
    if (r < 0) {
        ct_err_prefix(err, "the block job ended but its result could not be recorded: ");
    }
    return r;
}

int live_job_done_finish(struct m_ctx *x, struct mgr_plan **plan_out, struct ct_err *err)
{
    struct mgr_plan *p = x->plan;
    size_t j = 0;
    int r = 0;
    for (size_t i = 0; i < p->ns; i++) {
        struct m_step *s = &p->steps[i];
        bool drop = s->kind == ST_COMMIT || s->kind == ST_COPY ||
                    (s->kind == ST_PULL && is_live_top(x, s->a)) ||
                    (s->kind == ST_REBASE && in_list(x->inuse, x->ninuse, s->a));
        if (!drop && r == 0 && s->kind != ST_CATALOG && in_list(x->inuse, x->ninuse, s->a) &&
            s->kind != ST_CREATE_OVERLAY) {
            r = refuse(x, "change", s->a, err);
        }
        if (drop) {
            step_clear(s);
            continue;
        }
        p->steps[j++] = *s;
    }
    p->ns = j;
    if (r < 0) {
        return r;
    }
    x->live = false;
    m_probe_set_force_share(false);
    x->extra_sql = mgr_xstrdup(done_sql);
    return ctx_finish(x, false, plan_out, err);
}

static const char *const outcome_names[] = {"success", "aborted", "failed"};

/* The job concluded with oc: note the outcome in its row, dismiss it, record it. The note
 * lets the next command record a dismissed job's end (QEMU 7.2's storage daemon crashes on
 * query-named-block-nodes while a concluded stream job waits to be dismissed, so the job is
 * dismissed before the catalog work, which queries the nodes). */
static int end_job(struct mgr *m, struct jobrow *jr, enum outcome oc, const char *why,
                   struct ct_err *err)
{
    int r = jobrow_note(m, jr, "outcome", outcome_names[oc], err);
    if (r == 0 && why) {
        r = jobrow_note(m, jr, "error", why, err);
    }
    if (r < 0) {
        return r;
    }
    if (m->qmp) {
        json_object *a = json_object_new_object();
        json_object_object_add(a, "id", json_object_new_string(jr->job));
        struct ct_err e2 = {0};
        (void)qmp_execute(m->qmp, "job-dismiss", a, NULL, &e2);
    }
    return conclude(m, jr, oc, why, err);
}

enum follow_mode { F_END, F_SYNC, F_PIVOT, F_ABORT_READY };

static void progress(struct mgr *m, const char *type, uint64_t done, uint64_t total, int *last)
{
    int pct = total ? (int)(done * 100 / total) : 100;
    if (pct == *last || !m->opts.progress) {
        return;
    }
    *last = pct;
    m->opts.progress(m->opts.opaque, job_what(type), done, total ? total : 1);
}

/* Follow the job to the point mode asks for, with the home lock released meanwhile. */
static int follow(struct mgr *m, struct jobrow *jr, enum follow_mode mode, unsigned timeout_s,
                  struct ct_err *err)
{
    static const char *const names[] = {"BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED",
                                        "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR", NULL};
    int last = -1, r = 0;
    bool acted = false, concluded = false, timed_out = false;
    char *why = NULL;
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    flock(m->lock_fd, LOCK_UN);
    for (;;) {
        json_object *ev = NULL;
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (timeout_s && !timed_out && now.tv_sec - t0.tv_sec >= (time_t)timeout_s) {
            /* virsh's --timeout: abort the job, then follow it to its end. */
            timed_out = acted = true;
            flock(m->lock_fd, LOCK_EX);
            r = jobrow_note(m, jr, "sent", "cancel", err);
            flock(m->lock_fd, LOCK_UN);
            json_object *a = json_object_new_object();
            json_object_object_add(a, "device", json_object_new_string(jr->job));
            if (r == 0) {
                r = qmp_execute(m->qmp, "block-job-cancel", a, NULL, err);
            } else {
                json_object_put(a);
            }
            if (r < 0) {
                break;
            }
        }
        r = qmp_wait_event(m->qmp, names, jr->job, 250, &ev, err);
        if (r == -ETIMEDOUT) {
            r = 0;
        }
        if (r < 0) {
            break;
        }
        if (ev) {
            const char *name = qmp_str(ev, "event");
            json_object *data = NULL;
            json_object_object_get_ex(ev, "data", &data);
            if (mgr_streq(name, "BLOCK_JOB_COMPLETED") || mgr_streq(name, "BLOCK_JOB_CANCELLED")) {
                concluded = true;
                if (qmp_str(data, "error")) {
                    free(why);
                    why = mgr_xstrdup(qmp_str(data, "error"));
                }
                if (mgr_streq(name, "BLOCK_JOB_CANCELLED") &&
                    !mgr_streq(qmp_str(jr->args, "sent"), "cancel")) {
                    free(why);
                    why = mgr_xstrdup("cancelled");
                }
            }
            json_object_put(ev);
        }
        struct mgr_jobinfo ji;
        char *qerr = NULL;
        r = job_query(m, jr->job, &ji, &qerr, err);
        if (r < 0) {
            break;
        }
        if (!ji.exists || strcmp(ji.status, "concluded") == 0 || strcmp(ji.status, "null") == 0) {
            if (!ji.exists && !why && !concluded) {
                why = mgr_xstrdup("the daemon lost the job");
            }
            concluded = true;
            if (qerr && !why) {
                why = qerr;
                qerr = NULL;
            }
        } else {
            progress(m, jr->type, ji.offset, ji.len, &last);
        }
        free(qerr);
        if (concluded) {
            break;
        }
        if (ji.ready && !acted) {
            if (mode == F_SYNC) {
                progress(m, jr->type, ji.len, ji.len, &last);
                flock(m->lock_fd, LOCK_EX);
                free(why);
                return MGR_JOB_SYNCED;
            }
            if (mode == F_PIVOT || mode == F_ABORT_READY) {
                progress(m, jr->type, ji.len, ji.len, &last);
                flock(m->lock_fd, LOCK_EX);
                r = jobrow_note(m, jr, "sent", mode == F_PIVOT ? "complete" : "cancel", err);
                flock(m->lock_fd, LOCK_UN);
                json_object *a = json_object_new_object();
                json_object_object_add(a, "device", json_object_new_string(jr->job));
                if (r == 0) {
                    r = qmp_execute(m->qmp,
                                    mode == F_PIVOT ? "block-job-complete" : "block-job-cancel", a,
                                    NULL, err);
                } else {
                    json_object_put(a);
                }
                if (r < 0) {
                    break;
                }
                acted = true;
            }
        }
    }
    flock(m->lock_fd, LOCK_EX);
    if (r < 0) {
        free(why);
        if (r == -EPIPE) {
            ct_err_prefix(err, "the daemon died during the block job: ");
        }
        return r;
    }
    /* Someone else may have recorded the end while the lock was free. */
    struct jobrow cur;
    bool found;
    r = jobrow_find(m, jr->dom, jr->target, &cur, &found, err);
    if (r < 0 || !found) {
        free(why);
        return r < 0 ? r : MGR_JOB_DONE;
    }
    bool cancelled = mgr_streq(qmp_str(cur.args, "sent"), "cancel");
    enum outcome oc = why && !cancelled ? OUT_FAILED : cancelled ? OUT_ABORTED : OUT_SUCCESS;
    if (last < 100 && oc == OUT_SUCCESS) {
        progress(m, jr->type, 1, 1, &last);
    }
    r = end_job(m, &cur, oc, why, err);
    if (r == 0 && timed_out && oc != OUT_SUCCESS) {
        /* virsh: a job aborted by --timeout is a failure ("Commit aborted"). */
        r = ct_err_set(err, -ETIMEDOUT,
                       "block %s job on disk %s aborted: --timeout of %u s reached",
                       job_what(jr->type), jr->target, timeout_s);
    }
    jobrow_fini(&cur);
    free(why);
    return r < 0 ? r : oc == OUT_SUCCESS ? MGR_JOB_DONE : MGR_JOB_ABORTED;
}

int live_job_step(struct mgr *m, const struct m_step *s, struct ct_err *err)
{
    json_object *o = json_tokener_parse(s->a);
    if (!o) {
        return ct_err_set(err, -CT_E_CORRUPT, "journal: malformed live job step");
    }
    int r = live_connect(m, err);
    if (r == 0) {
        r = ct_err_set(err, -EPIPE, "the daemon is not running: the block job was not started");
    }
    json_object *args = NULL;
    json_object_object_get_ex(o, "arguments", &args);
    struct mgr_jobinfo ji;
    if (r > 0) {
        r = job_query(m, qmp_str(args, "job-id"), &ji, NULL, err);
    }
    if (r == 0 && !ji.exists) {
        r = qmp_execute(m->qmp, qmp_str(o, "execute"), json_object_get(args), NULL, err);
    }
    json_object_put(o);
    return r < 0 ? r : 0;
}

/* Snapshots the model marks invalid that the catalog still has valid. */
static char *invalidation_sql(struct m_ctx *x, struct m_domain *d)
{
    struct m_cat *old = NULL;
    struct sbuf b = {0};
    if (cat_load(x->m, &old, NULL) < 0) {
        return sb_steal(&b);
    }
    struct m_domain *od = m_domain_find(old, d->name);
    for (size_t i = 0; od && i < d->ns; i++) {
        struct m_snap *os = m_snap_find(od, d->snaps[i]->name);
        if (os && os->valid && !d->snaps[i]->valid) {
            char *q = sqlite3_mprintf("UPDATE snapshots SET valid=0 WHERE domain=%Q AND name=%Q;\n",
                                      d->name, os->name);
            sb_adds(&b, q);
            sqlite3_free(q);
        }
    }
    m_cat_free(old);
    return sb_steal(&b);
}

int live_job_begin(struct m_ctx *x, struct m_domain *d, struct m_disk *k, enum live_job_op op,
                   const struct mgr_block_opts *o, struct ct_err *err)
{
    struct mgr *m = x->m;
    size_t di = (size_t)(k - d->disks);
    const char *livetop = di < x->nlive_tops ? x->live_tops[di] : k->top;
    if (live_jobs_pending(m, d->name)) {
        struct jobrow jr;
        bool found;
        if (jobrow_find(m, d->name, k->target, &jr, &found, err) == 0 && found) {
            jobrow_fini(&jr);
            return ct_err_set(err, -CT_E_BUSY,
                              "disk %s already has an active block job (see `cowtree blockjob "
                              "%s %s`)",
                              k->target, d->name, k->target);
        }
    }
    struct live_node *v = NULL;
    size_t n = 0;
    int r = live_nodes(m, &v, &n, err);
    if (r < 0) {
        return r;
    }
    struct live_node *ln = node_of_file(v, n, livetop);
    if (!ln) {
        nodes_free(v, n);
        return ct_err_set(err, -ENODEV, "'%s' is not open in the daemon", livetop);
    }
    char *nodebase = node_name_for(d->name, k->target);
    char *job = mgr_xasprintf("j%s", nodebase);
    free(nodebase);
    json_object *args = json_object_new_object();
    json_object_object_add(args, "job-id", json_object_new_string(job));
    json_object_object_add(args, "device", json_object_new_string(ln->name));
    if (m->opts.speed) {
        json_object_object_add(args, "speed", json_object_new_int64((int64_t)m->opts.speed));
    }
    json_object_object_add(args, "auto-dismiss", json_object_new_boolean(0));
    json_object *row = json_object_new_object();
    const char *cmd = NULL, *type = NULL;
    enum follow_mode mode = F_END;
    bool wait = o->wait;
    const struct m_step *first = NULL, *last = NULL;
    for (size_t i = 0; i < x->plan->ns; i++) {
        enum m_step_kind want = op == LJ_COMMIT ? ST_COMMIT : op == LJ_PULL ? ST_PULL : ST_COPY;
        if (x->plan->steps[i].kind == want) {
            if (!first) {
                first = &x->plan->steps[i];
            }
            last = &x->plan->steps[i];
        }
    }
    if (!first) {
        r = ct_err_set(err, -EINVAL, "nothing for the daemon to do");
    } else if (op == LJ_COMMIT) {
        const char *top = last->a, *base = first->b;
        bool active = strcmp(top, livetop) == 0;
        cmd = "block-commit";
        type = active ? "active-commit" : "commit";
        if (active && !o->active && !o->pivot && !o->keep_overlay) {
            r = ct_err_set(err, -EINVAL,
                           "'%s' is the active layer of running domain %s: committing it needs "
                           "--active (a two-phase commit ended by --pivot or --keep-overlay)",
                           top, d->name);
        }
        if (!active) {
            json_object_object_add(args, "top", json_object_new_string(top));
        }
        json_object_object_add(args, "base", json_object_new_string(base));
        mode = active ? (o->pivot ? F_PIVOT : o->keep_overlay ? F_ABORT_READY : F_SYNC) : F_END;
        wait |= o->pivot || o->keep_overlay;
        json_object_object_add(row, "top", json_object_new_string(top));
        json_object_object_add(row, "base", json_object_new_string(base));
    } else if (op == LJ_PULL) {
        cmd = "block-stream";
        type = "pull";
        if (first->b) {
            json_object_object_add(args, "base", json_object_new_string(first->b));
            json_object_object_add(row, "base", json_object_new_string(first->b));
        }
    } else {
        cmd = "drive-mirror";
        type = "copy";
        json_object_object_add(args, "target", json_object_new_string(first->b));
        json_object_object_add(args, "format", json_object_new_string(first->c));
        json_object_object_add(args, "sync", json_object_new_string(first->d ? "top" : "full"));
        json_object_object_add(args, "mode",
                               json_object_new_string(first->n ? "existing" : "absolute-paths"));
        json_object_object_add(row, "dest", json_object_new_string(first->b));
        json_object_object_add(row, "format", json_object_new_string(first->c));
        json_object_object_add(row, "reuse", json_object_new_boolean(first->n != 0));
        mode = o->pivot ? F_PIVOT : o->finish ? F_ABORT_READY : F_SYNC;
        wait |= o->pivot || o->finish;
    }
    nodes_free(v, n);
    json_object_object_add(row, "shallow", json_object_new_boolean(o->shallow));
    json_object_object_add(row, "delete", json_object_new_boolean(o->delete_layers));
    if (r < 0) {
        json_object_put(args);
        json_object_put(row);
        free(job);
        return r;
    }
    /* Journal: start the job, then record it with the invalidations it makes. */
    json_object *call = json_object_new_object();
    json_object_object_add(call, "execute", json_object_new_string(cmd));
    json_object_object_add(call, "arguments", args);
    struct mgr_plan *p = plan_new(op == LJ_COMMIT ? "blockcommit"
                                  : op == LJ_PULL ? "blockpull"
                                                  : "blockcopy",
                                  d->name);
    plan_add(p, ST_LIVE, json_object_to_json_string_ext(call, JSON_C_TO_STRING_PLAIN), NULL, "job",
             NULL, NULL, 0, 0);
    char *inv = invalidation_sql(x, d);
    char *ins = sqlite3_mprintf(
        "INSERT OR REPLACE INTO livejobs(domain, target, job, type, args, started) VALUES(%Q, "
        "%Q, %Q, %Q, %Q, %lld)",
        d->name, k->target, job, type, json_object_to_json_string_ext(row, JSON_C_TO_STRING_PLAIN),
        (long long)time(NULL));
    char *sql = mgr_xasprintf("%s%s;", inv, ins);
    sqlite3_free(ins);
    free(inv);
    json_object_put(call);
    r = plan_run(m, p, sql, err);
    free(sql);
    mgr_plan_free(p);
    json_object_put(row);
    if (r < 0) {
        free(job);
        return r;
    }
    if (!wait) {
        free(job);
        return MGR_JOB_STARTED;
    }
    struct jobrow jr;
    bool found;
    r = jobrow_find(m, d->name, k->target, &jr, &found, err);
    if (r == 0 && found) {
        r = follow(m, &jr, mode, o->timeout_s, err);
    }
    jobrow_fini(&jr);
    free(job);
    return r;
}

static int job_of(struct mgr *m, const char *dom, const char *disk, struct jobrow *jr,
                  struct ct_err *err)
{
    struct m_cat *cat;
    struct m_domain *d;
    int r = load_dom(m, dom, &cat, &d, err);
    if (r < 0) {
        return r;
    }
    struct m_disk *k = m_disk_find(d, disk);
    char *target = k ? mgr_xstrdup(k->target) : NULL;
    m_cat_free(cat);
    if (!target) {
        return ct_err_set(err, -ENOENT, "domain %s has no disk '%s'", dom, disk);
    }
    bool found;
    r = jobrow_find(m, dom, target, jr, &found, err);
    if (r == 0 && !found) {
        r = ct_err_set(err, -ENOENT, "No current block job for %s", target);
    }
    free(target);
    if (r == 0) {
        r = live_connect(m, err);
        if (r == 0) {
            r = ct_err_set(err, -EPIPE, "the daemon is not running");
        }
        r = r > 0 ? 0 : r;
    }
    if (r < 0) {
        jobrow_fini(jr);
    }
    return r;
}

int mgr_blockjob_info(struct mgr *m, const char *dom, const char *disk, struct mgr_jobinfo *out,
                      struct ct_err *err)
{
    memset(out, 0, sizeof(*out));
    struct jobrow jr;
    int r = job_of(m, dom, disk, &jr, err);
    if (r == -ENOENT && strstr(err->msg, "No current block job")) {
        return 0;
    }
    if (r < 0) {
        return r;
    }
    r = job_query(m, jr.job, out, NULL, err);
    if (r == 0) {
        snprintf(out->type, sizeof(out->type), "%s", jr.type);
    }
    jobrow_fini(&jr);
    return r;
}

int mgr_blockjob_end(struct mgr *m, const char *dom, const char *disk, bool pivot, bool async,
                     struct ct_err *err)
{
    struct jobrow jr;
    int r = job_of(m, dom, disk, &jr, err);
    if (r < 0) {
        return r;
    }
    struct mgr_jobinfo ji;
    r = job_query(m, jr.job, &ji, NULL, err);
    if (r == 0 && pivot && !ji.ready) {
        r = ct_err_set(err, -CT_E_BUSY,
                       "block job on disk %s is not ready for pivot yet (wait for the "
                       "synchronized phase)",
                       jr.target);
    }
    if (r == 0 && pivot && !mgr_streq(jr.type, "active-commit") && !mgr_streq(jr.type, "copy")) {
        r = ct_err_set(err, -EINVAL, "only an active commit or a copy can pivot");
    }
    if (r == 0 && ji.exists && strcmp(ji.status, "concluded") != 0) {
        r = jobrow_note(m, &jr, "sent", pivot ? "complete" : "cancel", err);
        json_object *a = json_object_new_object();
        json_object_object_add(a, "device", json_object_new_string(jr.job));
        if (r == 0) {
            r = qmp_execute(m->qmp, pivot ? "block-job-complete" : "block-job-cancel", a, NULL,
                            err);
        } else {
            json_object_put(a);
        }
    }
    if (r == 0) {
        r = async ? (pivot ? MGR_JOB_DONE : MGR_JOB_ABORTED) : follow(m, &jr, F_END, 0, err);
    }
    jobrow_fini(&jr);
    return r;
}

int mgr_blockjob_set_speed(struct mgr *m, const char *dom, const char *disk, uint64_t speed,
                           struct ct_err *err)
{
    struct jobrow jr;
    int r = job_of(m, dom, disk, &jr, err);
    if (r < 0) {
        return r;
    }
    json_object *a = json_object_new_object();
    json_object_object_add(a, "device", json_object_new_string(jr.job));
    json_object_object_add(a, "speed", json_object_new_int64((int64_t)speed));
    r = qmp_execute(m->qmp, "block-job-set-speed", a, NULL, err);
    jobrow_fini(&jr);
    return r;
}

int live_jobs_sync(struct mgr *m, struct ct_err *err)
{
    struct jobrow *v;
    size_t n;
    int r = jobrows(m, NULL, NULL, &v, &n, err);
    if (r < 0 || n == 0) {
        jobrows_free(v, n);
        return r;
    }
    r = live_connect(m, err);
    for (size_t i = 0; i < n && r >= 0; i++) {
        struct mgr_jobinfo ji = {0};
        char *why = NULL;
        if (r > 0) {
            r = job_query(m, v[i].job, &ji, &why, err);
            if (r == -EPIPE) {
                r = 0;
            } else if (r == 0) {
                r = 1;
            }
        }
        if (r >= 0 && ji.exists && strcmp(ji.status, "concluded") != 0) {
            free(why);
            continue; /* still running */
        }
        bool cancelled = mgr_streq(qmp_str(v[i].args, "sent"), "cancel");
        enum outcome oc = !ji.exists  ? OUT_ABORTED /* daemon gone or job lost */
                          : why       ? (cancelled ? OUT_ABORTED : OUT_FAILED)
                          : cancelled ? OUT_ABORTED
                                      : OUT_SUCCESS;
        const char *noted = qmp_str(v[i].args, "outcome");
        if (noted) {
            /* Dismissed by a command that could not record its end: do it now. */
            oc = mgr_streq(noted, "success")   ? OUT_SUCCESS
                 : mgr_streq(noted, "aborted") ? OUT_ABORTED
                                               : OUT_FAILED;
            if (!why && qmp_str(v[i].args, "error")) {
                why = mgr_xstrdup(qmp_str(v[i].args, "error"));
            }
        }
        /* A failure to record the end is not this command's failure: the row stays and the
         * next command (or `blockjob`) tries again; reconcile shows the disagreement. */
        struct ct_err e2 = {0};
        if (ji.exists) {
            (void)end_job(m, &v[i], oc, why, &e2);
        } else {
            (void)conclude(m, &v[i], oc, why, &e2);
        }
        free(why);
        if (r >= 0) {
            r = m->qmp ? 1 : 0;
        }
    }
    jobrows_free(v, n);
    return r < 0 ? r : 0;
}

/* A commit step of a plan (snapshot-delete merging a layer of the running chain) as a live
 * block-commit run to its end inside the step: done already when the top left the daemon's
 * chain; finished offline when the daemon is gone. */
static int live_commit_step(struct mgr *m, const struct m_step *s, struct ct_err *err)
{
    json_object *a = json_tokener_parse(s->a);
    if (!a) {
        return ct_err_set(err, -CT_E_CORRUPT, "journal: malformed live commit step");
    }
    const char *top = qmp_str(a, "top"), *base = qmp_str(a, "base");
    bool active = qmp_bool(a, "active", false);
    int r = live_connect(m, err);
    struct live_node *v = NULL;
    size_t n = 0;
    if (r > 0) {
        r = live_nodes(m, &v, &n, err);
        r = r == -EPIPE ? 0 : r < 0 ? r : 1;
    }
    if (r == 0) {
        /* No daemon: the commit the shut-off domain's plan would have made. */
        struct m_step off = {.kind = ST_COMMIT,
                             .a = (char *)top,
                             .b = (char *)base,
                             .c = (char *)qmp_str(a, "base-format"),
                             .d = (char *)qmp_str(a, "top-format")};
        r = mgr_file_exists(top) ? journal_step_do(m, &off, err) : 0;
        json_object_put(a);
        return r;
    }
    struct live_node *dev = NULL;
    for (size_t i = 0; i < n && !dev; i++) {
        for (size_t j = 0; j < v[i].nchain; j++) {
            if (!v[i].ro && strcmp(v[i].chain[j], top) == 0) {
                dev = &v[i];
                break;
            }
        }
    }
    if (r < 0 || !dev) {
        nodes_free(v, n);
        json_object_put(a);
        return r < 0 ? r : 0; /* the top left the chain: done (J1) */
    }
    uint32_t h = 2166136261u;
    for (const char *p = top; *p; p++) {
        h = (h ^ (uint8_t)*p) * 16777619u;
    }
    char job[32];
    snprintf(job, sizeof(job), "jc%08x", h);
    struct mgr_jobinfo ji;
    r = job_query(m, job, &ji, NULL, err);
    if (r == 0 && !ji.exists) {
        json_object *args = json_object_new_object();
        json_object_object_add(args, "job-id", json_object_new_string(job));
        json_object_object_add(args, "device", json_object_new_string(dev->name));
        if (!active) {
            json_object_object_add(args, "top", json_object_new_string(top));
        }
        json_object_object_add(args, "base", json_object_new_string(base));
        json_object_object_add(args, "auto-dismiss", json_object_new_boolean(0));
        if (m->opts.speed) {
            json_object_object_add(args, "speed", json_object_new_int64((int64_t)m->opts.speed));
        }
        r = qmp_execute(m->qmp, "block-commit", args, NULL, err);
    }
    nodes_free(v, n);
    json_object_put(a);
    static const char *const names[] = {"BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED",
                                        "BLOCK_JOB_CANCELLED", NULL};
    bool completing = false;
    int last = -1;
    char *why = NULL;
    while (r == 0) {
        json_object *ev = NULL;
        r = qmp_wait_event(m->qmp, names, job, 250, &ev, err);
        if (r == -ETIMEDOUT) {
            r = 0;
        }
        json_object_put(ev);
        if (r == 0) {
            r = job_query(m, job, &ji, &why, err);
        }
        if (r < 0) {
            break;
        }
        if (!ji.exists || strcmp(ji.status, "concluded") == 0) {
            break;
        }
        progress(m, "commit", ji.offset, ji.len, &last);
        if (ji.ready && active && !completing) {
            json_object *c = json_object_new_object();
            json_object_object_add(c, "device", json_object_new_string(job));
            r = qmp_execute(m->qmp, "block-job-complete", c, NULL, err);
            completing = true;
        }
    }
    if (r == 0) {
        json_object *d = json_object_new_object();
        json_object_object_add(d, "id", json_object_new_string(job));
        struct ct_err e2 = {0};
        (void)qmp_execute(m->qmp, "job-dismiss", d, NULL, &e2);
        if (why) {
            r = ct_err_set(err, -EIO, "live commit of '%s' into '%s' failed: %s", top, base, why);
        } else if (last < 100) {
            progress(m, "commit", 1, 1, &last);
        }
    }
    free(why);
    return r;
}
