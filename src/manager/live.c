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
    r = 0;
    size_t added = 0;
    for (size_t i = 0; i < d->nd && r == 0; i++) {
        struct m_disk *k = &d->disks[i];
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
            added++;
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
        if (r == -ENOTSUP) {
            r = ct_err_set(err, -ENOTSUP,
                           "the daemon cannot close one domain's disks while other domains run "
                           "(it lacks %s); shut the other domains down first",
                           err->msg);
        }
        free(id);
        free(node);
    }
    nodes_free(v, n);
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
        case ST_INTERNAL_APPLY:
        case ST_REBASE:
        case ST_PULL:
        case ST_REMOVE:
            if (in_list(x->inuse, x->ninuse, s->a)) {
                r = refuse(x, s->kind == ST_REMOVE ? "remove" : "rewrite", s->a, err);
            }
            break;
        case ST_COMMIT:
            if (in_list(x->inuse, x->ninuse, s->b) || is_live_top(x, s->a)) {
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

int live_step_do(struct mgr *m, const struct m_step *s, struct ct_err *err)
{
    if (s->c && strcmp(s->c, "job") == 0) {
        return live_job_step(m, s, err);
    }
    return run_actions(m, s, false, err);
}

int live_step_undo(struct mgr *m, const struct m_step *s, struct ct_err *err)
{
    if (s->c && strcmp(s->c, "job") == 0) {
        return 0;
    }
    return run_actions(m, s, true, err);
}

int live_job_step(struct mgr *m, const struct m_step *s, struct ct_err *err)
{
    return ct_err_set(err, -ENOTSUP, "live block jobs are not implemented yet");
}
