/*
 * cowtree: the snapshot manager's command-line tool, virsh's verbs over cowtree's own image
 * engine. This file is the only part of the manager that parses argv, reads the environment,
 * prints and exits; everything else is in src/manager/ (manager.h).
 *
 * Output follows virsh 9 (tables, `--tree` drawing, `Key:  value` blocks) so that scripts
 * and eyes used to virsh read it the same; `--output=json` gives the same facts as JSON with
 * numbers as numbers.
 *
 * Environment:
 *   COWTREE_HOME                    catalog directory (default ~/.local/share/cowtree, or
 *                                   /var/lib/cowtree for root)
 *   COWTREE_FAULT                   engine fault injection (tests), as for cowtree-img
 *   COWTREE_MANAGER_KILL_AT_STEP=N  SIGKILL at the N-th journal point (tests)
 *   COWTREE_DAEMON                  the daemon `start` runs (default: cowtreed beside this
 *                                   program, else from PATH), as `DAEMON --home DIR`
 *
 * Exit status: 0 success; 1 error; 2 usage; 3 not found (domain, disk, snapshot, file);
 * 4 refused (exists, protected, unsaved changes, busy); 5 catalog and files disagree.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <json-c/json.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli/cli-util.h"
#include "manager/manager.h"

#define JSON_FLAGS                                                                                 \
    (JSON_C_TO_STRING_PRETTY | JSON_C_TO_STRING_SPACED | JSON_C_TO_STRING_NOSLASHESCAPE)

enum { EXIT_USAGE = 2, EXIT_NOTFOUND = 3, EXIT_REFUSED = 4, EXIT_MISMATCH = 5 };

static struct mgr *mgr;
static unsigned long kill_at;
static bool verbose;

static int exit_code(int r)
{
    switch (-r) {
    case 0:
        return 0;
    case ENOENT:
        return EXIT_NOTFOUND;
    case EEXIST:
    case CT_E_BUSY:
        return EXIT_REFUSED;
    case CT_E_CORRUPT:
        return EXIT_MISMATCH;
    default:
        return 1;
    }
}

static int fail(int r, const struct ct_err *err)
{
    cli_error("error: %s", err->msg[0] ? err->msg : ct_strerror(r));
    return exit_code(r);
}

static int usage_error(const char *cmd, const char *usage)
{
    cli_error("usage: cowtree %s", usage);
    (void)cmd;
    return EXIT_USAGE;
}

static void kill_hook(void *opaque, unsigned point)
{
    if (kill_at && point == kill_at) {
        fflush(stdout);
        fflush(stderr);
        kill(getpid(), SIGKILL);
    }
}

static void progress_hook(void *opaque, const char *what, uint64_t done, uint64_t total)
{
    if (!verbose) {
        return;
    }
    const char *label = strcmp(what, "commit") == 0 ? "Block Commit"
                        : strcmp(what, "pull") == 0 ? "Block Pull"
                        : strcmp(what, "copy") == 0 ? "Block Copy"
                                                    : "Materialize";
    unsigned pct = total ? (unsigned)(done * 100 / total) : 100;
    fprintf(stderr, "\r%s: [%3u %%]", label, pct);
    if (done >= total) {
        fputc('\n', stderr);
    }
}

/* cowtreed beside this program (the build tree), else from PATH. */
static char *daemon_prog(void)
{
    const char *e = getenv("COWTREE_DAEMON");
    if (e && *e) {
        return strdup(e);
    }
    char self[4096];
    ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 16);
    if (n > 0) {
        self[n] = '\0';
        char *slash = strrchr(self, '/');
        if (slash) {
            strcpy(slash + 1, "cowtreed");
            if (access(self, X_OK) == 0) {
                return strdup(self);
            }
        }
    }
    return strdup("cowtreed");
}

static char *home_dir(void)
{
    const char *h = getenv("COWTREE_HOME");
    if (h && *h) {
        return strdup(h);
    }
    if (geteuid() == 0) {
        return strdup("/var/lib/cowtree");
    }
    const char *xdg = getenv("XDG_DATA_HOME");
    if (xdg && *xdg) {
        char *p;
        return asprintf(&p, "%s/cowtree", xdg) < 0 ? NULL : p;
    }
    const char *home = getenv("HOME");
    char *p;
    return asprintf(&p, "%s/.local/share/cowtree", home && *home ? home : ".") < 0 ? NULL : p;
}

static int open_mgr(bool no_recover, uint64_t speed)
{
    char *home = home_dir();
    if (!home) {
        cli_error("error: out of memory");
        return 1;
    }
    struct mgr_opts o = {.home = home,
                         .no_recover = no_recover,
                         .kill_point = kill_hook,
                         .progress = progress_hook,
                         .speed = speed};
    char *prog = daemon_prog();
    o.daemon = prog;
    struct ct_err err = {0};
    int r = mgr_open(&mgr, &o, &err);
    free(home);
    free(prog);
    return r < 0 ? fail(r, &err) : 0;
}

static void print_json(json_object *o)
{
    printf("%s\n", json_object_to_json_string_ext(o, JSON_FLAGS));
    json_object_put(o);
}

static json_object *jstr(const char *s)
{
    return s ? json_object_new_string(s) : NULL;
}

static bool parse_output(const char *v, bool *json)
{
    if (strcmp(v, "json") == 0) {
        *json = true;
    } else if (strcmp(v, "human") == 0) {
        *json = false;
    } else {
        cli_error("error: --output must be human or json");
        return false;
    }
    return true;
}

/* ---- virsh's table (vsh-table.c): " cell" + padding to the column width + 2 spaces ---- */

struct table {
    size_t ncols, nrows;
    char **cells; /* nrows * ncols */
};

static void table_row(struct table *t, const char *const *cells)
{
    t->cells = realloc(t->cells, (t->nrows + 1) * t->ncols * sizeof(char *));
    if (!t->cells) {
        abort();
    }
    for (size_t i = 0; i < t->ncols; i++) {
        t->cells[t->nrows * t->ncols + i] = strdup(cells[i] ? cells[i] : "");
    }
    t->nrows++;
}

static void table_print(struct table *t)
{
    size_t *w = calloc(t->ncols, sizeof(size_t));
    for (size_t r = 0; r < t->nrows; r++) {
        for (size_t c = 0; c < t->ncols; c++) {
            size_t l = strlen(t->cells[r * t->ncols + c]);
            if (l > w[c]) {
                w[c] = l;
            }
        }
    }
    for (size_t r = 0; r < t->nrows; r++) {
        for (size_t c = 0; c < t->ncols; c++) {
            const char *s = t->cells[r * t->ncols + c];
            printf(" %s", s);
            if (c + 1 < t->ncols) {
                printf("%*s", (int)(w[c] - strlen(s) + 2), "");
            }
        }
        printf("\n");
        if (r == 0) {
            for (size_t c = 0; c < t->ncols; c++) {
                for (size_t i = 0; i < w[c] + 3; i++) {
                    putchar('-');
                }
            }
            printf("\n");
        }
    }
    printf("\n");
    for (size_t i = 0; i < t->nrows * t->ncols; i++) {
        free(t->cells[i]);
    }
    free(t->cells);
    free(w);
}

static const char *fmt_time(int64_t t, char *buf, size_t len)
{
    time_t tt = (time_t)t;
    struct tm tm;
    localtime_r(&tt, &tm);
    strftime(buf, len, "%Y-%m-%d %H:%M:%S %z", &tm);
    return buf;
}

/* ---- define / undefine / list / dominfo / domblklist ---- */

static char *read_file(const char *path)
{
    FILE *f = strcmp(path, "-") == 0 ? stdin : fopen(path, "r");
    if (!f) {
        cli_error("error: cannot open '%s': %s", path, strerror(errno));
        return NULL;
    }
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    size_t n;
    while (buf && (n = fread(buf + len, 1, cap - len - 1, f)) > 0) {
        len += n;
        if (len + 1 == cap) {
            cap *= 2;
            buf = realloc(buf, cap);
        }
    }
    if (f != stdin) {
        fclose(f);
    }
    if (!buf) {
        abort();
    }
    buf[len] = '\0';
    return buf;
}

static int cmd_define(int argc, char **argv)
{
    static const char usage[] = "define NAME --disk TARGET=PATH[,format=FMT]... | define FILE.xml";
    static const struct option lo[] = {{"disk", required_argument, NULL, 'd'}, {0}};
    struct mgr_disk_arg disks[64];
    char *copies[64];
    size_t nd = 0;
    int c, rc = 0;
    while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        if (c != 'd' || nd == 64) {
            return usage_error("define", usage);
        }
        char *v = strdup(optarg);
        char *eq = strchr(v, '=');
        if (!eq || eq == v) {
            cli_error("error: --disk wants TARGET=PATH, got '%s'", optarg);
            free(v);
            return EXIT_USAGE;
        }
        *eq = '\0';
        disks[nd] = (struct mgr_disk_arg){.target = v, .path = eq + 1};
        char *fmt = strstr(eq + 1, ",format=");
        if (fmt) {
            *fmt = '\0';
            disks[nd].format = fmt + 8;
        }
        copies[nd++] = v;
    }
    if (optind + 1 != argc) {
        rc = usage_error("define", usage);
        goto out;
    }
    const char *arg = argv[optind];
    if ((rc = open_mgr(false, 0)) != 0) {
        goto out;
    }
    struct ct_err err = {0};
    int r;
    size_t al = strlen(arg);
    if (nd == 0 && al > 4 && strcmp(arg + al - 4, ".xml") == 0) {
        char *xml = read_file(arg);
        if (!xml) {
            rc = 1;
            goto out;
        }
        char *name = NULL;
        r = mgr_define_xml(mgr, xml, &name, &err);
        free(xml);
        if (r == 0) {
            printf("Domain '%s' defined from %s\n\n", name, arg);
        }
        free(name);
    } else {
        r = mgr_define(mgr, arg, disks, nd, &err);
        if (r == 0) {
            printf("Domain '%s' defined\n\n", arg);
        }
    }
    rc = r < 0 ? fail(r, &err) : 0;
out:
    for (size_t i = 0; i < nd; i++) {
        free(copies[i]);
    }
    return rc;
}

static int cmd_undefine(int argc, char **argv)
{
    static const struct option lo[] = {{"snapshots-metadata", no_argument, NULL, 's'},
                                       {"remove-all-storage", no_argument, NULL, 'r'},
                                       {0}};
    unsigned flags = 0;
    int c;
    while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        if (c == 's') {
            flags |= MGR_UNDEFINE_SNAPSHOTS;
        } else if (c == 'r') {
            flags |= MGR_UNDEFINE_STORAGE;
        } else {
            return usage_error("undefine",
                               "undefine DOM [--snapshots-metadata] [--remove-all-storage]");
        }
    }
    if (optind + 1 != argc) {
        return usage_error("undefine",
                           "undefine DOM [--snapshots-metadata] [--remove-all-storage]");
    }
    int rc = open_mgr(false, 0);
    if (rc) {
        return rc;
    }
    struct ct_err err = {0};
    int r = mgr_undefine(mgr, argv[optind], flags, &err);
    if (r < 0) {
        return fail(r, &err);
    }
    printf("Domain '%s' has been undefined\n\n", argv[optind]);
    return 0;
}

static int cmd_list(int argc, char **argv)
{
    static const struct option lo[] = {{"all", no_argument, NULL, 'a'},
                                       {"inactive", no_argument, NULL, 'i'},
                                       {"name", no_argument, NULL, 'n'},
                                       {"output", required_argument, NULL, 'O'},
                                       {0}};
    bool names_only = false, json = false, all = false, inactive = false;
    int c;
    while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        if (c == 'n') {
            names_only = true;
        } else if (c == 'O') {
            if (!parse_output(optarg, &json)) {
                return EXIT_USAGE;
            }
        } else if (c == 'a') {
            all = true;
        } else if (c == 'i') {
            inactive = true;
        } else {
            return usage_error("list", "list [--all | --inactive] [--name] [--output=json]");
        }
    }
    int rc = open_mgr(false, 0);
    if (rc) {
        return rc;
    }
    struct ct_err err = {0};
    char **names;
    size_t n;
    int r = mgr_domain_names(mgr, &names, &n, &err);
    if (r < 0) {
        return fail(r, &err);
    }
    /* virsh: running domains by default, --inactive the others, --all both. */
    json_object *a = json_object_new_array();
    struct table t = {.ncols = 3};
    table_row(&t, (const char *const[]){"Id", "Name", "State"});
    for (size_t i = 0; i < n; i++) {
        struct mgr_domain_info *d;
        if (mgr_domain_get(mgr, names[i], &d, &err) < 0) {
            continue;
        }
        bool show = all || (inactive ? !d->run.running : d->run.running);
        if (show) {
            char id[24] = "-";
            if (d->run.running) {
                snprintf(id, sizeof(id), "%lld", (long long)d->run.id);
            }
            if (json) {
                json_object *o = json_object_new_object();
                json_object_object_add(o, "id",
                                       d->run.running ? json_object_new_int64(d->run.id) : NULL);
                json_object_object_add(o, "name", jstr(d->name));
                json_object_object_add(o, "uuid", jstr(d->uuid));
                json_object_object_add(o, "state", jstr(d->run.state));
                json_object_object_add(o, "reason", jstr(d->run.reason));
                json_object_object_add(o, "disks", json_object_new_int64((int64_t)d->nd));
                json_object_object_add(o, "snapshots", json_object_new_int64((int64_t)d->ns));
                json_object_object_add(o, "current", jstr(d->current));
                json_object_array_add(a, o);
            } else if (names_only) {
                printf("%s\n", d->name);
            } else {
                table_row(&t, (const char *const[]){id, d->name, d->run.state});
            }
        }
        mgr_domain_info_free(d);
    }
    if (json) {
        print_json(a);
    } else {
        json_object_put(a);
        if (names_only) {
            printf("\n");
        } else {
            table_print(&t);
        }
    }
    if (names_only || json) {
        for (size_t i = 0; i < t.nrows * t.ncols; i++) {
            free(t.cells[i]);
        }
        free(t.cells);
    }
    mgr_strv_free(names, n);
    return 0;
}

/* ---- running domains: start / shutdown / destroy / domstate ---- */

static int cmd_start(int argc, char **argv)
{
    static const struct option lo[] = {
        {"output", required_argument, NULL, 'O'}, {"paused", no_argument, NULL, 'p'}, {0}};
    bool json = false;
    int c;
    while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        if (c == 'O') {
            if (!parse_output(optarg, &json)) {
                return EXIT_USAGE;
            }
        } else if (c == 'p') {
            cli_error("error: --paused: cowtree domains have no CPUs to pause; their disks are "
                      "served as soon as they start");
            return 1;
        } else {
            return usage_error("start", "start DOM [--output=json]");
        }
    }
    if (optind + 1 != argc) {
        return usage_error("start", "start DOM [--output=json]");
    }
    int rc = open_mgr(false, 0);
    if (rc) {
        return rc;
    }
    struct ct_err err = {0};
    char **uris;
    size_t n;
    int r = mgr_start(mgr, argv[optind], &uris, &n, &err);
    if (r < 0) {
        cli_error("error: Failed to start domain '%s'", argv[optind]);
        return fail(r, &err);
    }
    if (json) {
        json_object *o = json_object_new_object();
        json_object *a = json_object_new_array();
        for (size_t i = 0; i < n; i++) {
            json_object_array_add(a, jstr(uris[i]));
        }
        json_object_object_add(o, "domain", jstr(argv[optind]));
        json_object_object_add(o, "uris", a);
        print_json(o);
    } else {
        printf("Domain '%s' started\n", argv[optind]);
        for (size_t i = 0; i < n; i++) {
            printf("%s\n", uris[i]);
        }
        printf("\n");
    }
    mgr_strv_free(uris, n);
    return 0;
}

static int cmd_shutdown(int argc, char **argv)
{
    if (argc != 2 || argv[1][0] == '-') {
        return usage_error(argv[0], "shutdown DOM");
    }
    int rc = open_mgr(false, 0);
    if (rc) {
        return rc;
    }
    struct ct_err err = {0};
    int r = mgr_shutdown(mgr, argv[1], &err);
    if (r < 0) {
        cli_error("error: Failed to shutdown domain '%s'", argv[1]);
        return fail(r, &err);
    }
    printf("Domain '%s' is being shutdown\n\n", argv[1]);
    return 0;
}

static int cmd_domstate(int argc, char **argv)
{
    static const struct option lo[] = {{"reason", no_argument, NULL, 'r'}, {0}};
    bool reason = false;
    int c;
    while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        if (c == 'r') {
            reason = true;
        } else {
            return usage_error("domstate", "domstate DOM [--reason]");
        }
    }
    if (optind + 1 != argc) {
        return usage_error("domstate", "domstate DOM [--reason]");
    }
    int rc = open_mgr(false, 0);
    if (rc) {
        return rc;
    }
    struct ct_err err = {0};
    struct mgr_domstate st;
    int r = mgr_domstate(mgr, argv[optind], &st, &err);
    if (r < 0) {
        return fail(r, &err);
    }
    if (reason) {
        printf("%s (%s)\n\n", st.state, st.reason);
    } else {
        printf("%s\n\n", st.state);
    }
    return 0;
}

static int one_dom_args(int argc, char **argv, const char *usage, bool *json, bool *details)
{
    static const struct option lo[] = {{"output", required_argument, NULL, 'O'},
                                       {"details", no_argument, NULL, 'd'},
                                       {"inactive", no_argument, NULL, 'i'},
                                       {0}};
    int c;
    while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        if (c == 'O') {
            if (!parse_output(optarg, json)) {
                return -1;
            }
        } else if (c == 'd' && details) {
            *details = true;
        } else if (c != 'i') {
            usage_error(argv[0], usage);
            return -1;
        }
    }
    if (optind + 1 != argc) {
        usage_error(argv[0], usage);
        return -1;
    }
    return 0;
}

static int cmd_dominfo(int argc, char **argv)
{
    bool json = false;
    if (one_dom_args(argc, argv, "dominfo DOM [--output=json]", &json, NULL) < 0) {
        return EXIT_USAGE;
    }
    int rc = open_mgr(false, 0);
    if (rc) {
        return rc;
    }
    struct ct_err err = {0};
    struct mgr_domain_info *d;
    int r = mgr_domain_get(mgr, argv[optind], &d, &err);
    if (r < 0) {
        return fail(r, &err);
    }
    if (json) {
        json_object *o = json_object_new_object();
        json_object_object_add(o, "name", jstr(d->name));
        json_object_object_add(o, "uuid", jstr(d->uuid));
        json_object_object_add(o, "type", jstr(d->type));
        json_object_object_add(o, "state", jstr(d->run.state));
        json_object_object_add(o, "id", d->run.running ? json_object_new_int64(d->run.id) : NULL);
        json_object_object_add(o, "persistent", json_object_new_boolean(1));
        json_object_object_add(o, "disks", json_object_new_int64((int64_t)d->nd));
        json_object_object_add(o, "snapshots", json_object_new_int64((int64_t)d->ns));
        json_object_object_add(o, "current", jstr(d->current));
        json_object_object_add(o, "origin", jstr(d->origin));
        json_object_object_add(o, "created", json_object_new_int64(d->created));
        print_json(o);
    } else {
        char id[24] = "-";
        if (d->run.running) {
            snprintf(id, sizeof(id), "%lld", (long long)d->run.id);
        }
        printf("%-15s %s\n", "Id:", id);
        printf("%-15s %s\n", "Name:", d->name);
        printf("%-15s %s\n", "UUID:", d->uuid);
        printf("%-15s %s\n", "OS Type:", "hvm");
        printf("%-15s %s\n", "State:", d->run.state);
        printf("%-15s %s\n", "Persistent:", "yes");
        printf("%-15s %s\n", "Autostart:", "disable");
        printf("%-15s %s\n", "Managed save:", "no");
        printf("%-15s %zu\n", "Disks:", d->nd);
        printf("%-15s %zu\n", "Snapshots:", d->ns);
        printf("%-15s %s\n", "Current:", d->current ? d->current : "-");
        if (d->origin) {
            printf("%-15s %s\n", "Cloned from:", d->origin);
        }
        printf("\n");
    }
    mgr_domain_info_free(d);
    return 0;
}

static int cmd_domblklist(int argc, char **argv)
{
    bool json = false, details = false;
    if (one_dom_args(argc, argv, "domblklist DOM [--details] [--output=json]", &json, &details) <
        0) {
        return EXIT_USAGE;
    }
    int rc = open_mgr(false, 0);
    if (rc) {
        return rc;
    }
    struct ct_err err = {0};
    struct mgr_domain_info *d;
    int r = mgr_domain_get(mgr, argv[optind], &d, &err);
    if (r < 0) {
        return fail(r, &err);
    }
    if (json) {
        json_object *a = json_object_new_array();
        for (size_t i = 0; i < d->nd; i++) {
            json_object *o = json_object_new_object();
            json_object_object_add(o, "type", jstr("file"));
            json_object_object_add(o, "device", jstr("disk"));
            json_object_object_add(o, "target", jstr(d->disks[i].target));
            json_object_object_add(o, "source", jstr(d->disks[i].top));
            json_object_object_add(o, "format", jstr(d->disks[i].format));
            json_object *ch = json_object_new_array();
            for (size_t j = 0; j < d->disks[i].nchain; j++) {
                json_object_array_add(ch, jstr(d->disks[i].chain[j]));
            }
            json_object_object_add(o, "chain", ch);
            json_object_array_add(a, o);
        }
        print_json(a);
    } else {
        struct table t = {.ncols = details ? 4 : 2};
        if (details) {
            table_row(&t, (const char *const[]){"Type", "Device", "Target", "Source"});
        } else {
            table_row(&t, (const char *const[]){"Target", "Source"});
        }
        for (size_t i = 0; i < d->nd; i++) {
            if (details) {
                table_row(
                    &t, (const char *const[]){"file", "disk", d->disks[i].target, d->disks[i].top});
            } else {
                table_row(&t, (const char *const[]){d->disks[i].target, d->disks[i].top});
            }
        }
        table_print(&t);
    }
    mgr_domain_info_free(d);
    return 0;
}

static int cmd_images(int argc, char **argv)
{
    bool json = false;
    if (one_dom_args(argc, argv, "images DOM [--output=json]", &json, NULL) < 0) {
        return EXIT_USAGE;
    }
    int rc = open_mgr(false, 0);
    if (rc) {
        return rc;
    }
    struct ct_err err = {0};
    struct mgr_domain_info *d;
    int r = mgr_domain_get(mgr, argv[optind], &d, &err);
    if (r < 0) {
        return fail(r, &err);
    }
    if (json) {
        json_object *a = json_object_new_array();
        for (size_t i = 0; i < d->ni; i++) {
            json_object *o = json_object_new_object();
            json_object_object_add(o, "path", jstr(d->images[i].path));
            json_object_object_add(o, "target", jstr(d->images[i].target));
            json_object_object_add(o, "format", jstr(d->images[i].format));
            json_object_object_add(o, "backing", jstr(d->images[i].backing));
            json_object_object_add(o, "owned", json_object_new_boolean(d->images[i].owned));
            json_object_array_add(a, o);
        }
        print_json(a);
    } else {
        struct table t = {.ncols = 5};
        table_row(&t, (const char *const[]){"Target", "Format", "Owned", "Image", "Backing"});
        for (size_t i = 0; i < d->ni; i++) {
            table_row(&t, (const char *const[]){
                              d->images[i].target ? d->images[i].target : "-", d->images[i].format,
                              d->images[i].owned ? "yes" : "no", d->images[i].path,
                              d->images[i].backing ? d->images[i].backing : "-"});
        }
        table_print(&t);
    }
    mgr_domain_info_free(d);
    return 0;
}

/* ---- snapshot-create-as / snapshot-create ---- */

/* virsh's --diskspec: DISK[,snapshot=TYPE][,driver=FMT][,stype=file][,file=PATH]; ",," is a
 * literal comma. */
static int parse_diskspec(const char *arg, struct mgr_diskspec *sp, char **storage)
{
    char *s = malloc(strlen(arg) + 1);
    size_t n = 0;
    char **fields = NULL;
    size_t nf = 0;
    char *cur = s;
    for (const char *p = arg;; p++) {
        if (*p == ',' && p[1] == ',') {
            s[n++] = ',';
            p++;
            continue;
        }
        if (*p == ',' || *p == '\0') {
            s[n++] = '\0';
            fields = realloc(fields, (nf + 1) * sizeof(char *));
            fields[nf++] = cur;
            cur = s + n;
            if (!*p) {
                break;
            }
            continue;
        }
        s[n++] = *p;
    }
    *storage = s;
    memset(sp, 0, sizeof(*sp));
    sp->kind = -1;
    int r = 0;
    for (size_t i = 0; i < nf; i++) {
        char *f = fields[i];
        char *eq = strchr(f, '=');
        if (i == 0 && !eq) {
            sp->disk = f;
            continue;
        }
        if (!eq) {
            cli_error("error: --diskspec: unexpected '%s' in '%s'", f, arg);
            r = -1;
            break;
        }
        *eq = '\0';
        const char *v = eq + 1;
        if (strcmp(f, "snapshot") == 0) {
            if (strcmp(v, "internal") == 0) {
                sp->kind = MGR_KIND_INTERNAL;
            } else if (strcmp(v, "external") == 0) {
                sp->kind = MGR_KIND_EXTERNAL;
            } else if (strcmp(v, "no") == 0) {
                sp->kind = MGR_KIND_NO;
            } else {
                cli_error("error: --diskspec: snapshot must be internal, external or no, not "
                          "'%s'",
                          v);
                r = -1;
            }
        } else if (strcmp(f, "file") == 0) {
            sp->file = v;
        } else if (strcmp(f, "driver") == 0) {
            sp->driver = v;
        } else if (strcmp(f, "stype") == 0) {
            if (strcmp(v, "file") != 0) {
                cli_error("error: --diskspec: only stype=file is supported");
                r = -1;
            }
        } else if (i == 0 && strcmp(f, "disk") == 0) {
            sp->disk = (char *)v;
        } else {
            cli_error("error: --diskspec: unknown key '%s'", f);
            r = -1;
        }
        if (r < 0) {
            break;
        }
    }
    if (r == 0 && !sp->disk) {
        cli_error("error: --diskspec '%s' names no disk", arg);
        r = -1;
    }
    free(fields);
    return r;
}

static int cmd_snapshot_create_as(int argc, char **argv)
{
    static const char usage[] =
        "snapshot-create-as DOM [NAME [DESC]] [--name N] [--description D] [--disk-only] "
        "[--diskspec DISK[,snapshot=internal|external|no][,file=PATH][,driver=qcow2]]... "
        "[--atomic] [--reuse-external] [--no-metadata] [--print-xml]";
    static const struct option lo[] = {
        {"name", required_argument, NULL, 'n'},    {"description", required_argument, NULL, 'D'},
        {"disk-only", no_argument, NULL, 'o'},     {"diskspec", required_argument, NULL, 's'},
        {"atomic", no_argument, NULL, 'a'},        {"reuse-external", no_argument, NULL, 'r'},
        {"no-metadata", no_argument, NULL, 'm'},   {"print-xml", no_argument, NULL, 'p'},
        {"quiesce", no_argument, NULL, 'q'},       {"live", no_argument, NULL, 'l'},
        {"halt", no_argument, NULL, 'h'},          {"validate", no_argument, NULL, 'v'},
        {"memspec", required_argument, NULL, 'M'}, {0}};
    struct mgr_create_opts o = {0};
    struct mgr_diskspec specs[64];
    char *store[64];
    size_t ns = 0;
    bool print = false;
    int c, rc = 0;
    while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (c) {
        case 'n':
            o.name = optarg;
            break;
        case 'D':
            o.desc = optarg;
            break;
        case 'o':
            o.disk_only = true;
            break;
        case 'a':
            o.atomic = true;
            break;
        case 'r':
            o.reuse_external = true;
            break;
        case 'm':
            o.no_metadata = true;
            break;
        case 'p':
            print = true;
            break;
        case 'v':
            break;
        case 's':
            if (ns == 64 || parse_diskspec(optarg, &specs[ns], &store[ns]) < 0) {
                if (ns < 64) {
                    free(store[ns]);
                }
                rc = EXIT_USAGE;
                goto out;
            }
            ns++;
            break;
        case 'q':
            cli_error("error: --quiesce needs a running domain with a guest agent; cowtree "
                      "domains are never running");
            rc = 1;
            goto out;
        case 'l':
        case 'h':
            cli_error("error: --live and --halt need a running domain");
            rc = 1;
            goto out;
        case 'M':
            cli_error("error: memory snapshots are not supported (the domain is not running)");
            rc = 1;
            goto out;
        default:
            rc = usage_error("snapshot-create-as", usage);
            goto out;
        }
    }
    int npos = argc - optind;
    if (npos < 1 || npos > 3) {
        rc = usage_error("snapshot-create-as", usage);
        goto out;
    }
    const char *dom = argv[optind];
    if (npos >= 2) {
        if (o.name) {
            rc = usage_error("snapshot-create-as", usage);
            goto out;
        }
        o.name = argv[optind + 1];
    }
    if (npos == 3) {
        if (o.desc) {
            rc = usage_error("snapshot-create-as", usage);
            goto out;
        }
        o.desc = argv[optind + 2];
    }
    o.specs = specs;
    o.nspecs = ns;
    if (print) {
        char *xml = mgr_snapshot_print_xml(&o);
        fputs(xml, stdout);
        free(xml);
        goto out;
    }
    if ((rc = open_mgr(false, 0)) != 0) {
        goto out;
    }
    struct ct_err err = {0};
    char *name = NULL;
    int r = mgr_snapshot_create(mgr, dom, &o, &name, &err);
    if (r < 0) {
        rc = fail(r, &err);
    } else {
        printf("Domain snapshot %s created\n", name);
    }
    free(name);
out:
    for (size_t i = 0; i < ns; i++) {
        free(store[i]);
    }
    return rc;
}

static int cmd_snapshot_create(int argc, char **argv)
{
    static const char usage[] = "snapshot-create DOM [FILE.xml] [--redefine [--current]] "
                                "[--disk-only] [--reuse-external] [--no-metadata] [--atomic]";
    static const struct option lo[] = {{"redefine", no_argument, NULL, 'R'},
                                       {"current", no_argument, NULL, 'c'},
                                       {"disk-only", no_argument, NULL, 'o'},
                                       {"reuse-external", no_argument, NULL, 'r'},
                                       {"no-metadata", no_argument, NULL, 'm'},
                                       {"atomic", no_argument, NULL, 'a'},
                                       {"validate", no_argument, NULL, 'v'},
                                       {"xmlfile", required_argument, NULL, 'x'},
                                       {0}};
    struct mgr_create_opts o = {0};
    bool redefine = false, current = false;
    const char *file = NULL;
    int c;
    while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (c) {
        case 'R':
            redefine = true;
            break;
        case 'c':
            current = true;
            break;
        case 'o':
            o.disk_only = true;
            break;
        case 'r':
            o.reuse_external = true;
            break;
        case 'm':
            o.no_metadata = true;
            break;
        case 'a':
            o.atomic = true;
            break;
        case 'v':
            break;
        case 'x':
            file = optarg;
            break;
        default:
            return usage_error("snapshot-create", usage);
        }
    }
    int npos = argc - optind;
    if (npos < 1 || npos > 2 || (npos == 2 && file)) {
        return usage_error("snapshot-create", usage);
    }
    const char *dom = argv[optind];
    if (npos == 2) {
        file = argv[optind + 1];
    }
    char *xml = file ? read_file(file) : strdup("<domainsnapshot/>");
    if (!xml) {
        return 1;
    }
    int rc = open_mgr(false, 0);
    if (rc) {
        free(xml);
        return rc;
    }
    struct ct_err err = {0};
    char *name = NULL;
    int r = mgr_snapshot_create_xml(mgr, dom, xml, &o, redefine, current, &name, &err);
    free(xml);
    if (r < 0) {
        return fail(r, &err);
    }
    printf("Domain snapshot %s %s\n", name, redefine ? "defined" : "created");
    free(name);
    return 0;
}

/* ---- listing ---- */

static struct mgr_domain_info *get_dom(const char *name, int *rc)
{
    struct ct_err err = {0};
    struct mgr_domain_info *d;
    int r = mgr_domain_get(mgr, name, &d, &err);
    if (r < 0) {
        *rc = fail(r, &err);
        return NULL;
    }
    return d;
}

static json_object *snap_json(const struct mgr_domain_info *d, const struct mgr_snap_info *s)
{
    json_object *o = json_object_new_object();
    json_object_object_add(o, "name", jstr(s->name));
    json_object_object_add(o, "domain", jstr(d->name));
    json_object_object_add(o, "description", jstr(s->desc));
    json_object_object_add(o, "creation_time", json_object_new_int64(s->ctime));
    json_object_object_add(o, "state", jstr(s->state));
    json_object_object_add(o, "parent", jstr(s->parent));
    json_object_object_add(o, "current", json_object_new_boolean(s->current));
    json_object_object_add(o, "location", jstr(s->location));
    json_object_object_add(o, "children", json_object_new_int64((int64_t)s->nchildren));
    json_object_object_add(o, "descendants", json_object_new_int64((int64_t)s->ndescendants));
    json_object_object_add(o, "metadata", json_object_new_boolean(1));
    json_object_object_add(o, "protected", json_object_new_boolean(s->protect));
    json_object_object_add(o, "valid", json_object_new_boolean(s->valid));
    json_object *a = json_object_new_array();
    for (size_t i = 0; i < s->nd; i++) {
        const struct mgr_snapdisk_info *k = &s->disks[i];
        json_object *dk = json_object_new_object();
        json_object_object_add(dk, "target", jstr(k->target));
        json_object_object_add(dk, "snapshot", jstr(mgr_kind_name(k->kind)));
        json_object_object_add(dk, "image", jstr(k->image));
        json_object_object_add(dk, "file", jstr(k->file));
        json_object_object_add(dk, "driver", jstr(k->driver));
        json_object_object_add(dk, "materialized", jstr(k->mat));
        json_object_array_add(a, dk);
    }
    json_object_object_add(o, "disks", a);
    return o;
}

/* virsh's vshTreePrintInternal, over the selected snapshots. */
struct tree {
    const struct mgr_domain_info *d;
    const size_t *idx;
    size_t n;
};

static const char *tree_parent(const struct tree *t, size_t i)
{
    const char *p = t->d->snaps[t->idx[i]].parent;
    for (size_t j = 0; p && j < t->n; j++) {
        if (strcmp(t->d->snaps[t->idx[j]].name, p) == 0) {
            return p;
        }
    }
    return NULL; /* parent not listed: a root here */
}

static void tree_print(const struct tree *t, size_t dev, size_t lastdev, bool root, char *indent,
                       size_t *ilen)
{
    const char *name = t->d->snaps[t->idx[dev]].name;
    printf("%s%s%s\n", indent, root ? "" : "+- ", name);
    if (!root) {
        indent[(*ilen)++] = dev == lastdev ? ' ' : '|';
        indent[(*ilen)++] = ' ';
        indent[*ilen] = '\0';
    }
    size_t nextlast = (size_t)-1;
    for (size_t i = 0; i < t->n; i++) {
        const char *p = tree_parent(t, i);
        if (p && strcmp(p, name) == 0) {
            nextlast = i;
        }
    }
    if (nextlast != (size_t)-1) {
        printf("%s  |\n", indent);
    }
    indent[(*ilen)++] = ' ';
    indent[(*ilen)++] = ' ';
    indent[*ilen] = '\0';
    for (size_t i = 0; i < t->n; i++) {
        const char *p = tree_parent(t, i);
        if (p && strcmp(p, name) == 0) {
            tree_print(t, i, nextlast, false, indent, ilen);
        }
    }
    *ilen -= 2;
    indent[*ilen] = '\0';
    if (nextlast == (size_t)-1 && dev == lastdev) {
        printf("%s\n", indent);
    }
    if (!root) {
        *ilen -= 2;
        indent[*ilen] = '\0';
    }
}

static void dot_escape(const char *s)
{
    for (; *s; s++) {
        if (*s == '"' || *s == '\\') {
            putchar('\\');
        }
        putchar(*s);
    }
}

static int cmd_snapshot_list(int argc, char **argv)
{
    static const char usage[] =
        "snapshot-list DOM [--tree] [--dot] [--parent] [--roots] [--leaves] [--no-leaves] "
        "[--current] [--internal] [--external] [--disk-only] [--from NAME [--descendants]] "
        "[--topological] [--name] [--output=json]";
    static const struct option lo[] = {
        {"tree", no_argument, NULL, 't'},         {"dot", no_argument, NULL, 'g'},
        {"parent", no_argument, NULL, 'p'},       {"roots", no_argument, NULL, 'r'},
        {"leaves", no_argument, NULL, 'l'},       {"no-leaves", no_argument, NULL, 'L'},
        {"current", no_argument, NULL, 'c'},      {"internal", no_argument, NULL, 'i'},
        {"external", no_argument, NULL, 'e'},     {"disk-only", no_argument, NULL, 'o'},
        {"active", no_argument, NULL, 'A'},       {"inactive", no_argument, NULL, 'I'},
        {"metadata", no_argument, NULL, 'm'},     {"no-metadata", no_argument, NULL, 'M'},
        {"from", required_argument, NULL, 'f'},   {"descendants", no_argument, NULL, 'd'},
        {"topological", no_argument, NULL, 'T'},  {"name", no_argument, NULL, 'n'},
        {"output", required_argument, NULL, 'O'}, {0}};
    struct mgr_list_opts lo_ = {0};
    bool tree = false, dot = false, parent = false, names = false, json = false;
    int c;
    while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (c) {
        case 't':
            tree = true;
            break;
        case 'g':
            dot = true;
            break;
        case 'p':
            parent = true;
            break;
        case 'r':
            lo_.roots = true;
            break;
        case 'l':
            lo_.leaves = true;
            break;
        case 'L':
            lo_.no_leaves = true;
            break;
        case 'c':
            lo_.current = true;
            break;
        case 'i':
            lo_.internal = true;
            break;
        case 'e':
            lo_.external = true;
            break;
        case 'o':
            lo_.disk_only = true;
            break;
        case 'A':
            lo_.active = true;
            break;
        case 'I':
            lo_.inactive = true;
            break;
        case 'm':
            break;
        case 'M':
            lo_.no_metadata = true;
            break;
        case 'f':
            lo_.from = optarg;
            break;
        case 'd':
            lo_.descendants = true;
            break;
        case 'T':
            lo_.topological = true;
            break;
        case 'n':
            names = true;
            break;
        case 'O':
            if (!parse_output(optarg, &json)) {
                return EXIT_USAGE;
            }
            break;
        default:
            return usage_error("snapshot-list", usage);
        }
    }
    if (optind + 1 != argc) {
        return usage_error("snapshot-list", usage);
    }
    if ((tree || dot) && (parent || names || lo_.roots)) {
        cli_error("error: --tree and --dot cannot be combined with --parent, --name or --roots");
        return EXIT_USAGE;
    }
    if (lo_.descendants && !lo_.from) {
        cli_error("error: --descendants requires --from");
        return EXIT_USAGE;
    }
    lo_.tree = tree || dot;
    int rc = open_mgr(false, 0);
    if (rc) {
        return rc;
    }
    struct mgr_domain_info *d = get_dom(argv[optind], &rc);
    if (!d) {
        return rc;
    }
    struct ct_err err = {0};
    size_t *idx, n;
    int r = mgr_snapshot_select(d, &lo_, &idx, &n, &err);
    if (r < 0) {
        mgr_domain_info_free(d);
        return fail(r, &err);
    }
    if (json) {
        json_object *a = json_object_new_array();
        for (size_t i = 0; i < n; i++) {
            json_object_array_add(a, snap_json(d, &d->snaps[idx[i]]));
        }
        print_json(a);
    } else if (dot) {
        printf("digraph \"");
        dot_escape(d->name);
        printf("\" {\n  rankdir=TB;\n  node [shape=box, style=rounded];\n");
        for (size_t i = 0; i < n; i++) {
            const struct mgr_snap_info *s = &d->snaps[idx[i]];
            printf("  \"");
            dot_escape(s->name);
            printf("\" [label=\"");
            dot_escape(s->name);
            printf("\\n%s%s\"%s];\n", s->location, s->protect ? ", protected" : "",
                   s->current ? ", style=\"rounded,bold\", color=blue" : "");
        }
        struct tree t = {d, idx, n};
        for (size_t i = 0; i < n; i++) {
            const char *p = tree_parent(&t, i);
            if (p) {
                printf("  \"");
                dot_escape(p);
                printf("\" -> \"");
                dot_escape(d->snaps[idx[i]].name);
                printf("\";\n");
            }
        }
        if (d->current) {
            printf("  \"(now)\" [shape=ellipse, style=dashed];\n  \"");
            dot_escape(d->current);
            printf("\" -> \"(now)\" [style=dashed];\n");
        }
        printf("}\n");
    } else if (tree) {
        struct tree t = {d, idx, n};
        char *indent = calloc(4 * (n + 2) + 8, 1);
        size_t ilen = 0;
        for (size_t i = 0; i < n; i++) {
            if (!tree_parent(&t, i)) {
                tree_print(&t, i, i, true, indent, &ilen);
            }
        }
        free(indent);
        printf("\n");
    } else if (names) {
        for (size_t i = 0; i < n; i++) {
            printf("%s\n", d->snaps[idx[i]].name);
        }
        printf("\n");
    } else {
        struct table t = {.ncols = parent ? 4 : 3};
        table_row(&t, (const char *const[]){"Name", "Creation Time", "State", "Parent"});
        for (size_t i = 0; i < n; i++) {
            const struct mgr_snap_info *s = &d->snaps[idx[i]];
            char tb[64];
            table_row(&t, (const char *const[]){s->name, fmt_time(s->ctime, tb, sizeof(tb)),
                                                s->state, s->parent ? s->parent : ""});
        }
        table_print(&t);
    }
    free(idx);
    mgr_domain_info_free(d);
    return 0;
}

/* DOM {SNAP | --current} */
static int snap_args(int argc, char **argv, const char *usage, const struct option *extra,
                     int (*on_opt)(int c, void *ctx), void *ctx, const char **dom,
                     const char **snap)
{
    struct option lo[24];
    size_t n = 0;
    lo[n++] = (struct option){"current", no_argument, NULL, 'C'};
    lo[n++] = (struct option){"snapshotname", required_argument, NULL, 'S'};
    lo[n++] = (struct option){"domain", required_argument, NULL, 'W'};
    for (; extra && extra->name && n < 23; extra++) {
        lo[n++] = *extra;
    }
    lo[n] = (struct option){0};
    bool current = false;
    *dom = *snap = NULL;
    int c;
    while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        if (c == 'C') {
            current = true;
        } else if (c == 'S') {
            *snap = optarg;
        } else if (c == 'W') {
            *dom = optarg;
        } else if (!on_opt || on_opt(c, ctx) < 0) {
            return usage_error(argv[0], usage);
        }
    }
    for (int i = optind; i < argc; i++) {
        if (!*dom) {
            *dom = argv[i];
        } else if (!*snap) {
            *snap = argv[i];
        } else {
            return usage_error(argv[0], usage);
        }
    }
    if (!*dom || (current && *snap) || (!current && !*snap)) {
        return usage_error(argv[0], usage);
    }
    return 0;
}

static int output_opt(int c, void *ctx)
{
    if (c == 'O') {
        return parse_output(optarg, (bool *)ctx) ? 0 : -1;
    }
    return -1;
}

static int cmd_snapshot_info(int argc, char **argv)
{
    static const struct option ex[] = {{"output", required_argument, NULL, 'O'}, {0}};
    bool json = false;
    const char *dom, *snap;
    int rc = snap_args(argc, argv, "snapshot-info DOM {SNAP | --current} [--output=json]", ex,
                       output_opt, &json, &dom, &snap);
    if (rc) {
        return rc;
    }
    if ((rc = open_mgr(false, 0)) != 0) {
        return rc;
    }
    struct mgr_domain_info *d = get_dom(dom, &rc);
    if (!d) {
        return rc;
    }
    ssize_t i = mgr_snap_index(d, snap ? snap : d->current);
    if (i < 0) {
        if (snap) {
            cli_error("error: Domain snapshot not found: no domain snapshot with matching name "
                      "'%s'",
                      snap);
        } else {
            cli_error("error: domain %s has no current snapshot", d->name);
        }
        mgr_domain_info_free(d);
        return EXIT_NOTFOUND;
    }
    const struct mgr_snap_info *s = &d->snaps[i];
    if (json) {
        print_json(snap_json(d, s));
    } else {
        printf("%-15s %s\n", "Name:", s->name);
        printf("%-15s %s\n", "Domain:", d->name);
        printf("%-15s %s\n", "Current:", s->current ? "yes" : "no");
        printf("%-15s %s\n", "State:", s->state);
        printf("%-15s %s\n", "Location:", s->location);
        printf("%-15s %s\n", "Parent:", s->parent ? s->parent : "-");
        printf("%-15s %zu\n", "Children:", s->nchildren);
        printf("%-15s %zu\n", "Descendants:", s->ndescendants);
        printf("%-15s %s\n", "Metadata:", "yes");
        printf("%-15s %s\n", "Protected:", s->protect ? "yes" : "no");
        if (!s->valid) {
            printf("%-15s %s\n", "Valid:", "no");
        }
        printf("\n");
    }
    mgr_domain_info_free(d);
    return 0;
}

static int cmd_snapshot_current(int argc, char **argv)
{
    static const struct option lo[] = {{"name", no_argument, NULL, 'n'},
                                       {"security-info", no_argument, NULL, 's'},
                                       {"snapshotname", required_argument, NULL, 'S'},
                                       {0}};
    bool name_only = false;
    const char *set = NULL;
    int c;
    while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        if (c == 'n') {
            name_only = true;
        } else if (c == 'S') {
            set = optarg;
        } else if (c != 's') {
            return usage_error("snapshot-current", "snapshot-current DOM [--name] [SNAP]");
        }
    }
    int npos = argc - optind;
    if (npos < 1 || npos > 2 || (npos == 2 && (set || name_only))) {
        return usage_error("snapshot-current", "snapshot-current DOM [--name] [SNAP]");
    }
    const char *dom = argv[optind];
    if (npos == 2) {
        set = argv[optind + 1];
    }
    int rc = open_mgr(false, 0);
    if (rc) {
        return rc;
    }
    struct ct_err err = {0};
    if (set) {
        int r = mgr_snapshot_set_current(mgr, dom, set, &err);
        if (r < 0) {
            return fail(r, &err);
        }
        printf("Snapshot %s set as current\n", set);
        return 0;
    }
    struct mgr_domain_info *d = get_dom(dom, &rc);
    if (!d) {
        return rc;
    }
    if (!d->current) {
        cli_error("error: domain '%s' has no current snapshot", d->name);
        mgr_domain_info_free(d);
        return EXIT_NOTFOUND;
    }
    if (name_only) {
        printf("%s\n", d->current);
    } else {
        char *xml;
        int r = mgr_snapshot_dumpxml(mgr, dom, d->current, &xml, &err);
        if (r < 0) {
            mgr_domain_info_free(d);
            return fail(r, &err);
        }
        fputs(xml, stdout);
        free(xml);
    }
    mgr_domain_info_free(d);
    return 0;
}

static int cmd_snapshot_parent(int argc, char **argv)
{
    const char *dom, *snap;
    int rc = snap_args(argc, argv, "snapshot-parent DOM {SNAP | --current}", NULL, NULL, NULL, &dom,
                       &snap);
    if (rc) {
        return rc;
    }
    if ((rc = open_mgr(false, 0)) != 0) {
        return rc;
    }
    struct mgr_domain_info *d = get_dom(dom, &rc);
    if (!d) {
        return rc;
    }
    ssize_t i = mgr_snap_index(d, snap ? snap : d->current);
    if (i < 0) {
        cli_error("error: Domain snapshot not found: no domain snapshot with matching name "
                  "'%s'",
                  snap ? snap : "(current)");
        rc = EXIT_NOTFOUND;
    } else if (!d->snaps[i].parent) {
        cli_error("error: snapshot '%s' has no parent", d->snaps[i].name);
        rc = EXIT_NOTFOUND;
    } else {
        printf("%s\n", d->snaps[i].parent);
    }
    mgr_domain_info_free(d);
    return rc;
}

static int accept_opt(int c, void *ctx)
{
    return 0;
}

static int cmd_snapshot_dumpxml(int argc, char **argv)
{
    static const struct option ex[] = {{"security-info", no_argument, NULL, 's'}, {0}};
    const char *dom, *snap;
    int rc = snap_args(argc, argv, "snapshot-dumpxml DOM {SNAP | --current}", ex, accept_opt, NULL,
                       &dom, &snap);
    if (rc) {
        return rc;
    }
    if ((rc = open_mgr(false, 0)) != 0) {
        return rc;
    }
    struct ct_err err = {0};
    char *xml = NULL;
    int r = mgr_snapshot_dumpxml(mgr, dom, snap, &xml, &err);
    if (r < 0) {
        return fail(r, &err);
    }
    fputs(xml, stdout);
    free(xml);
    return 0;
}

/* ---- plans (revert, delete, block jobs, clone) ---- */

static void print_plan(const struct mgr_plan *p, const char *op, const char *dom, bool dry,
                       bool json)
{
    size_t n = mgr_plan_nsteps(p);
    uint64_t bytes = 0;
    json_object *steps = json_object_new_array();
    json_object *written = json_object_new_array(), *created = json_object_new_array(),
                *removed = json_object_new_array();
    if (!json) {
        printf("Plan for %s of domain %s%s:\n", op, dom, dry ? " (dry run: nothing changed)" : "");
    }
    for (size_t i = 0; i < n; i++) {
        struct mgr_step_view v;
        mgr_plan_step(p, i, &v);
        bytes += v.bytes;
        if (v.path && v.creates) {
            json_object_array_add(created, jstr(v.path));
        } else if (v.path && v.writes) {
            json_object_array_add(written, jstr(v.path));
        } else if (v.path && v.removes) {
            json_object_array_add(removed, jstr(v.path));
        }
        json_object *o = json_object_new_object();
        json_object_object_add(o, "action", jstr(v.action));
        json_object_object_add(o, "path", jstr(v.path));
        json_object_object_add(o, "other", jstr(v.other));
        json_object_object_add(o, "snapshot", jstr(v.name));
        json_object_object_add(o, "bytes", json_object_new_int64((int64_t)v.bytes));
        json_object_array_add(steps, o);
        if (json) {
            continue;
        }
        if (strcmp(v.action, "catalog") == 0) {
            printf("  update the catalog\n");
        } else if (strcmp(v.action, "create") == 0) {
            printf("  create    %s (overlay on %s)\n", v.path, v.other);
        } else if (strcmp(v.action, "commit") == 0) {
            printf("  commit    %s into %s (%" PRIu64 " bytes)\n", v.other, v.path, v.bytes);
        } else if (strcmp(v.action, "pull") == 0) {
            printf("  pull      into %s, new backing %s (%" PRIu64 " bytes)\n", v.path,
                   v.other ? v.other : "none", v.bytes);
        } else if (strcmp(v.action, "rebase") == 0) {
            printf("  relink    %s onto %s\n", v.path, v.other ? v.other : "nothing");
        } else if (strcmp(v.action, "remove") == 0) {
            printf("  remove    %s\n", v.path);
        } else if (strcmp(v.action, "copy") == 0) {
            printf("  copy      %s to %s (up to %" PRIu64 " bytes)\n", v.other, v.path, v.bytes);
        } else if (strcmp(v.action, "live") == 0) {
            if (v.name && strcmp(v.name, "commit") == 0) {
                printf("  commit    %s into its backing file, live (block-commit in the "
                       "daemon)\n",
                       v.path);
            } else {
                printf("  live      %s (QMP: %s)\n", v.path ? v.path : "every disk", v.other);
            }
        } else if (strcmp(v.action, "materialize") == 0) {
            printf("  create    %s (state of internal snapshot %s of %s, up to %" PRIu64
                   " bytes)\n",
                   v.path, v.name, v.other, v.bytes);
        } else {
            printf("  %-9s %s (internal snapshot %s)\n", v.action, v.path, v.name);
        }
    }
    size_t nn = mgr_plan_nnotes(p);
    json_object *notes = json_object_new_array();
    for (size_t i = 0; i < nn; i++) {
        json_object_array_add(notes, jstr(mgr_plan_note(p, i)));
        if (!json) {
            printf("  note: %s\n", mgr_plan_note(p, i));
        }
    }
    if (json) {
        json_object *o = json_object_new_object();
        json_object_object_add(o, "operation", jstr(op));
        json_object_object_add(o, "domain", jstr(dom));
        json_object_object_add(o, "dry_run", json_object_new_boolean(dry));
        json_object_object_add(o, "steps", steps);
        json_object_object_add(o, "written", written);
        json_object_object_add(o, "created", created);
        json_object_object_add(o, "removed", removed);
        json_object_object_add(o, "bytes", json_object_new_int64((int64_t)bytes));
        json_object_object_add(o, "notes", notes);
        print_json(o);
        return;
    }
    printf("Files written: %zu, created: %zu, removed: %zu; bytes to move: %" PRIu64 "\n\n",
           json_object_array_length(written), json_object_array_length(created),
           json_object_array_length(removed), bytes);
    json_object_put(steps);
    json_object_put(written);
    json_object_put(created);
    json_object_put(removed);
    json_object_put(notes);
}

struct op_flags {
    unsigned flags;
    bool json;
};

static int revert_opt(int c, void *ctx)
{
    struct op_flags *f = ctx;
    switch (c) {
    case 'f':
        f->flags |= MGR_FORCE;
        return 0;
    case 'n':
        f->flags |= MGR_DRY_RUN;
        return 0;
    case 'O':
        return parse_output(optarg, &f->json) ? 0 : -1;
    case 'c':
        f->flags |= MGR_DELETE_CHILDREN;
        return 0;
    case 'o':
        f->flags |= MGR_DELETE_CHILDREN_ONLY;
        return 0;
    case 'm':
        f->flags |= MGR_DELETE_METADATA;
        return 0;
    case 'x':
        return 0;
    default:
        return -1;
    }
}

static int cmd_snapshot_revert(int argc, char **argv)
{
    static const struct option ex[] = {{"force", no_argument, NULL, 'f'},
                                       {"dry-run", no_argument, NULL, 'n'},
                                       {"output", required_argument, NULL, 'O'},
                                       {"running", no_argument, NULL, 'R'},
                                       {"paused", no_argument, NULL, 'R'},
                                       {"reset-nvram", no_argument, NULL, 'x'},
                                       {0}};
    struct op_flags f = {0};
    const char *dom, *snap;
    int rc = snap_args(argc, argv,
                       "snapshot-revert DOM {SNAP | --current} [--force] [--dry-run] "
                       "[--output=json]",
                       ex, revert_opt, &f, &dom, &snap);
    if (rc) {
        return rc;
    }
    if ((rc = open_mgr(false, 0)) != 0) {
        return rc;
    }
    struct ct_err err = {0};
    struct mgr_plan *plan = NULL;
    /* A running domain has no CPUs or memory to restore: reverting it is what a reset does
     * to its disks. They stop being served (clients are disconnected), the offline revert
     * runs, and they are served again at the same NBD URIs, whatever the revert's outcome. */
    struct mgr_domstate st = {0};
    bool restart = !(f.flags & MGR_DRY_RUN) && mgr_domstate(mgr, dom, &st, &err) == 0 && st.running;
    if (restart && mgr_shutdown(mgr, dom, &err) < 0) {
        cli_error("error: could not stop serving the disks of '%s' for the revert", dom);
        return fail(err.code, &err);
    }
    int r = mgr_snapshot_revert(mgr, dom, snap, f.flags, &plan, &err);
    if (restart) {
        struct ct_err e2 = {0};
        char **uris = NULL;
        size_t n = 0;
        if (mgr_start(mgr, dom, &uris, &n, &e2) < 0) {
            cli_error("error: the disks of '%s' could not be served again after the revert: %s "
                      "(cowtree start %s)",
                      dom, e2.msg, dom);
            if (r == 0) {
                r = e2.code;
                err = e2;
            }
        }
        mgr_strv_free(uris, n);
    }
    if (r < 0) {
        mgr_plan_free(plan);
        return fail(r, &err);
    }
    if ((f.flags & MGR_DRY_RUN) || f.json) {
        print_plan(plan, "snapshot-revert", dom, f.flags & MGR_DRY_RUN, f.json);
    } else {
        printf("Domain snapshot %s reverted\n\n", snap ? snap : "(current)");
    }
    mgr_plan_free(plan);
    return 0;
}

static int cmd_snapshot_delete(int argc, char **argv)
{
    static const struct option ex[] = {
        {"children", no_argument, NULL, 'c'},     {"children-only", no_argument, NULL, 'o'},
        {"metadata", no_argument, NULL, 'm'},     {"dry-run", no_argument, NULL, 'n'},
        {"output", required_argument, NULL, 'O'}, {0}};
    struct op_flags f = {0};
    const char *dom, *snap;
    int rc = snap_args(argc, argv,
                       "snapshot-delete DOM {SNAP | --current} [--children | --children-only] "
                       "[--metadata] [--dry-run] [--output=json]",
                       ex, revert_opt, &f, &dom, &snap);
    if (rc) {
        return rc;
    }
    if ((rc = open_mgr(false, 0)) != 0) {
        return rc;
    }
    struct ct_err err = {0};
    struct mgr_plan *plan = NULL;
    int r = mgr_snapshot_delete(mgr, dom, snap, f.flags, &plan, &err);
    if (r < 0) {
        mgr_plan_free(plan);
        return fail(r, &err);
    }
    if ((f.flags & MGR_DRY_RUN) || f.json) {
        print_plan(plan, "snapshot-delete", dom, f.flags & MGR_DRY_RUN, f.json);
    } else if (f.flags & MGR_DELETE_CHILDREN_ONLY) {
        printf("Domain snapshot %s children deleted\n\n", snap ? snap : "(current)");
    } else {
        printf("Domain snapshot %s deleted\n\n", snap ? snap : "(current)");
    }
    mgr_plan_free(plan);
    return 0;
}

static int protect_common(int argc, char **argv, bool on)
{
    const char *dom, *snap;
    int rc = snap_args(argc, argv,
                       on ? "snapshot-protect DOM {SNAP | --current}"
                          : "snapshot-unprotect DOM {SNAP | --current}",
                       NULL, NULL, NULL, &dom, &snap);
    if (rc) {
        return rc;
    }
    if ((rc = open_mgr(false, 0)) != 0) {
        return rc;
    }
    struct ct_err err = {0};
    int r = mgr_snapshot_protect(mgr, dom, snap, on, &err);
    if (r < 0) {
        return fail(r, &err);
    }
    printf("Domain snapshot %s %s\n\n", snap ? snap : "(current)",
           on ? "protected" : "unprotected");
    return 0;
}

static int cmd_snapshot_protect(int argc, char **argv)
{
    return protect_common(argc, argv, true);
}

static int cmd_snapshot_unprotect(int argc, char **argv)
{
    return protect_common(argc, argv, false);
}

/* ---- block jobs ---- */

struct block_args {
    struct mgr_block_opts o;
    unsigned flags;
    bool json, bytes, async, abort, info;
    bool bandwidth_given;
    uint64_t bandwidth;
    const char *dest;
};

static int block_parse(int argc, char **argv, const char *usage, struct block_args *a,
                       const char **dom, const char **disk, const char **third)
{
    static const struct option lo[] = {{"base", required_argument, NULL, 'b'},
                                       {"top", required_argument, NULL, 't'},
                                       {"shallow", no_argument, NULL, 's'},
                                       {"delete", no_argument, NULL, 'D'},
                                       {"active", no_argument, NULL, 'A'},
                                       {"pivot", no_argument, NULL, 'P'},
                                       {"finish", no_argument, NULL, 'F'},
                                       {"keep-overlay", no_argument, NULL, 'K'},
                                       {"wait", no_argument, NULL, 'W' + 256},
                                       {"async", no_argument, NULL, 'a' + 256},
                                       {"abort", no_argument, NULL, 'b' + 256},
                                       {"info", no_argument, NULL, 'i' + 256},
                                       {"verbose", no_argument, NULL, 'v'},
                                       {"timeout", required_argument, NULL, 'T'},
                                       {"keep-relative", no_argument, NULL, 'w'},
                                       {"bandwidth", required_argument, NULL, 'B'},
                                       {"bytes", no_argument, NULL, 'y'},
                                       {"dry-run", no_argument, NULL, 'n'},
                                       {"force", no_argument, NULL, 'f'},
                                       {"output", required_argument, NULL, 'O'},
                                       {"dest", required_argument, NULL, 'd'},
                                       {"format", required_argument, NULL, 'm'},
                                       {"raw", no_argument, NULL, 'r'},
                                       {"reuse-external", no_argument, NULL, 'R'},
                                       {"blockdev", no_argument, NULL, 'w'},
                                       {"transient-job", no_argument, NULL, 'w'},
                                       {"path", required_argument, NULL, 'p'},
                                       {"domain", required_argument, NULL, 'W'},
                                       {0}};
    *dom = *disk = *third = NULL;
    int c;
    while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (c) {
        case 'b':
            a->o.base = optarg;
            break;
        case 't':
            a->o.top = optarg;
            break;
        case 's':
            a->o.shallow = true;
            break;
        case 'D':
            a->o.delete_layers = true;
            break;
        case 'A':
            a->o.active = true;
            break;
        case 'P':
            a->o.pivot = true;
            break;
        case 'F':
            a->o.pivot = false;
            a->o.finish = true;
            break;
        case 'K':
            a->o.keep_overlay = true;
            break;
        case 'W' + 256:
            a->o.wait = true;
            break;
        case 'a' + 256:
            a->async = true;
            break;
        case 'b' + 256:
            a->abort = true;
            break;
        case 'i' + 256:
            a->info = true;
            break;
        case 'w':
            break;
        case 'v':
            verbose = true;
            break;
        case 'T': {
            char *end;
            unsigned long v = strtoul(optarg, &end, 10);
            if (*end || optarg[0] == '-' || v == 0) {
                cli_error("error: invalid --timeout '%s'", optarg);
                return EXIT_USAGE;
            }
            a->o.timeout_s = (unsigned)v;
            a->o.wait = true;
            break;
        }
        case 'B': {
            char *end;
            unsigned long long v = strtoull(optarg, &end, 10);
            if (*end || optarg[0] == '-') {
                cli_error("error: invalid --bandwidth '%s'", optarg);
                return EXIT_USAGE;
            }
            a->bandwidth = v;
            a->bandwidth_given = true;
            break;
        }
        case 'y':
            a->bytes = true;
            break;
        case 'n':
            a->flags |= MGR_DRY_RUN;
            break;
        case 'f':
            a->o.force = true;
            break;
        case 'O':
            if (!parse_output(optarg, &a->json)) {
                return EXIT_USAGE;
            }
            break;
        case 'd':
            a->dest = optarg;
            break;
        case 'm':
            a->o.format = optarg;
            break;
        case 'r':
            a->o.format = "raw";
            break;
        case 'R':
            a->o.reuse_external = true;
            break;
        case 'p':
            *disk = optarg;
            break;
        case 'W':
            *dom = optarg;
            break;
        default:
            return usage_error(argv[0], usage);
        }
    }
    for (int i = optind; i < argc; i++) {
        if (!*dom) {
            *dom = argv[i];
        } else if (!*disk) {
            *disk = argv[i];
        } else if (!*third) {
            *third = argv[i];
        } else {
            return usage_error(argv[0], usage);
        }
    }
    if (!*dom || !*disk) {
        return usage_error(argv[0], usage);
    }
    return 0;
}

static uint64_t speed_of(const struct block_args *a)
{
    if (!a->bandwidth) {
        return 0;
    }
    return a->bytes ? a->bandwidth : a->bandwidth << 20;
}

/* virsh's messages for a live job's outcome. */
static void job_result(int r, const char *what, bool pivot)
{
    switch (r) {
    case MGR_JOB_STARTED:
        printf("Block %s started\n", what);
        break;
    case MGR_JOB_SYNCED:
        printf("\nNow in synchronized phase\n");
        break;
    case MGR_JOB_DONE:
        printf("\n%s\n", pivot                       ? "Successfully pivoted"
                         : strcmp(what, "Copy") == 0 ? "Successfully copied"
                         : strcmp(what, "Pull") == 0 ? "Pull complete"
                                                     : "Commit complete");
        break;
    default:
        printf("\n%s\n", strcmp(what, "Copy") == 0   ? "Successfully copied"
                         : strcmp(what, "Pull") == 0 ? "Pull aborted"
                                                     : "Commit complete, overlay image kept");
        break;
    }
}

static int cmd_blockjob(int argc, char **argv)
{
    static const char usage[] = "blockjob DOM DISK [--info] [--abort [--async]] [--pivot] "
                                "[--bandwidth N [--bytes]] [--raw]";
    struct block_args a = {0};
    const char *dom, *disk, *extra;
    int rc = block_parse(argc, argv, usage, &a, &dom, &disk, &extra);
    if (rc) {
        return rc;
    }
    if (extra || (a.abort && a.o.pivot)) {
        return usage_error("blockjob", usage);
    }
    if ((rc = open_mgr(false, 0)) != 0) {
        return rc;
    }
    struct ct_err err = {0};
    int r;
    if (a.bandwidth_given) {
        r = mgr_blockjob_set_speed(mgr, dom, disk, speed_of(&a), &err);
        if (r < 0) {
            return fail(r, &err);
        }
        if (!a.abort && !a.o.pivot && !a.info) {
            return 0;
        }
    }
    if (a.abort || a.o.pivot) {
        r = mgr_blockjob_end(mgr, dom, disk, a.o.pivot, a.async, &err);
        if (r < 0) {
            return fail(r, &err);
        }
        if (a.o.pivot) {
            printf("\nSuccessfully pivoted\n");
        }
        return 0;
    }
    struct mgr_jobinfo ji;
    r = mgr_blockjob_info(mgr, dom, disk, &ji, &err);
    if (r < 0) {
        return fail(r, &err);
    }
    if (a.json) {
        json_object *o = json_object_new_object();
        json_object_object_add(o, "active", json_object_new_boolean(ji.exists));
        if (ji.exists) {
            json_object_object_add(o, "type", jstr(ji.type));
            json_object_object_add(o, "status", jstr(ji.status));
            json_object_object_add(o, "cur", json_object_new_int64((int64_t)ji.offset));
            json_object_object_add(o, "end", json_object_new_int64((int64_t)ji.len));
            json_object_object_add(o, "bandwidth", json_object_new_int64((int64_t)ji.speed));
            json_object_object_add(o, "ready", json_object_new_boolean(ji.ready));
        }
        print_json(o);
        return 0;
    }
    if (!ji.exists) {
        printf("No current block job for %s\n\n", disk);
        return 0;
    }
    const char *label = strcmp(ji.type, "pull") == 0            ? "Block Pull"
                        : strcmp(ji.type, "copy") == 0          ? "Block Copy"
                        : strcmp(ji.type, "active-commit") == 0 ? "Active Block Commit"
                                                                : "Block Commit";
    unsigned pct = ji.len ? (unsigned)(ji.offset * 100 / ji.len) : 0;
    printf("%s: [%3u %%]", label, pct);
    if (ji.speed) {
        printf("    Bandwidth limit: %llu bytes/s (%.3f MiB/s)", (unsigned long long)ji.speed,
               ji.speed / 1048576.0);
    }
    printf("\n\n");
    return 0;
}

static int cmd_blockcommit(int argc, char **argv)
{
    static const char usage[] = "blockcommit DOM DISK [--base PATH | --shallow] [--top PATH] "
                                "[--active [--pivot | --keep-overlay]] [--delete] [--wait] "
                                "[--timeout S] [--verbose] [--bandwidth MiB [--bytes]] "
                                "[--dry-run] [--force]";
    struct block_args a = {0};
    const char *dom, *disk, *extra;
    int rc = block_parse(argc, argv, usage, &a, &dom, &disk, &extra);
    if (rc) {
        return rc;
    }
    if (extra) {
        return usage_error("blockcommit", usage);
    }
    if ((rc = open_mgr(false, speed_of(&a))) != 0) {
        return rc;
    }
    struct ct_err err = {0};
    struct mgr_plan *plan = NULL;
    int r = mgr_blockcommit(mgr, dom, disk, &a.o, a.flags, &plan, &err);
    if (r < 0) {
        mgr_plan_free(plan);
        return fail(r, &err);
    }
    if (r > 0) {
        job_result(r, "Commit", a.o.pivot);
    } else if ((a.flags & MGR_DRY_RUN) || a.json) {
        print_plan(plan, "blockcommit", dom, a.flags & MGR_DRY_RUN, a.json);
    } else {
        printf("\nCommit complete\n");
    }
    mgr_plan_free(plan);
    return 0;
}

static int cmd_blockpull(int argc, char **argv)
{
    static const char usage[] = "blockpull DOM DISK [--base PATH] [--wait] [--timeout S] "
                                "[--verbose] [--bandwidth MiB [--bytes]] [--dry-run] [--force]";
    struct block_args a = {0};
    const char *dom, *disk, *extra;
    int rc = block_parse(argc, argv, usage, &a, &dom, &disk, &extra);
    if (rc) {
        return rc;
    }
    if (extra) {
        return usage_error("blockpull", usage);
    }
    if ((rc = open_mgr(false, speed_of(&a))) != 0) {
        return rc;
    }
    struct ct_err err = {0};
    struct mgr_plan *plan = NULL;
    int r = mgr_blockpull(mgr, dom, disk, &a.o, a.flags, &plan, &err);
    if (r < 0) {
        mgr_plan_free(plan);
        return fail(r, &err);
    }
    if (r > 0) {
        job_result(r, "Pull", false);
    } else if ((a.flags & MGR_DRY_RUN) || a.json) {
        print_plan(plan, "blockpull", dom, a.flags & MGR_DRY_RUN, a.json);
    } else {
        printf("\nPull complete\n");
    }
    mgr_plan_free(plan);
    return 0;
}

static int cmd_blockcopy(int argc, char **argv)
{
    static const char usage[] = "blockcopy DOM DISK {DEST | --dest DEST} [--shallow] "
                                "[--reuse-external] [--format raw|qcow2] [--pivot | --finish] "
                                "[--wait] [--timeout S] [--verbose] [--bandwidth MiB [--bytes]] "
                                "[--dry-run]";
    struct block_args a = {0};
    const char *dom, *disk, *dest;
    int rc = block_parse(argc, argv, usage, &a, &dom, &disk, &dest);
    if (rc) {
        return rc;
    }
    if (a.dest && dest) {
        return usage_error("blockcopy", usage);
    }
    a.o.dest = a.dest ? a.dest : dest;
    if (!a.o.dest) {
        return usage_error("blockcopy", usage);
    }
    if ((rc = open_mgr(false, speed_of(&a))) != 0) {
        return rc;
    }
    struct ct_err err = {0};
    struct mgr_plan *plan = NULL;
    int r = mgr_blockcopy(mgr, dom, disk, &a.o, a.flags, &plan, &err);
    if (r < 0) {
        mgr_plan_free(plan);
        return fail(r, &err);
    }
    if (r > 0) {
        job_result(r, "Copy", a.o.pivot);
    } else if ((a.flags & MGR_DRY_RUN) || a.json) {
        print_plan(plan, "blockcopy", dom, a.flags & MGR_DRY_RUN, a.json);
    } else {
        printf("\n%s\n", a.o.pivot ? "Successfully pivoted" : "Successfully copied");
    }
    mgr_plan_free(plan);
    return 0;
}

static int cmd_clone(int argc, char **argv)
{
    static const char usage[] = "clone DOM SNAPSHOT NEWDOM [--flatten] [--dry-run]";
    static const struct option lo[] = {{"flatten", no_argument, NULL, 'f'},
                                       {"dry-run", no_argument, NULL, 'n'},
                                       {"output", required_argument, NULL, 'O'},
                                       {0}};
    bool flatten = false, dry = false, json = false;
    int c;
    while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        if (c == 'f') {
            flatten = true;
        } else if (c == 'n') {
            dry = true;
        } else if (c == 'O') {
            if (!parse_output(optarg, &json)) {
                return EXIT_USAGE;
            }
        } else {
            return usage_error("clone", usage);
        }
    }
    if (argc - optind != 3) {
        return usage_error("clone", usage);
    }
    int rc = open_mgr(false, 0);
    if (rc) {
        return rc;
    }
    struct ct_err err = {0};
    struct mgr_plan *plan = NULL;
    const char *dom = argv[optind], *snap = argv[optind + 1], *nd = argv[optind + 2];
    int r = mgr_clone(mgr, dom, snap, nd, flatten, dry ? MGR_DRY_RUN : 0, &plan, &err);
    if (r < 0) {
        mgr_plan_free(plan);
        return fail(r, &err);
    }
    if (json || dry) {
        print_plan(plan, "clone", dom, dry, json);
    } else {
        printf("Domain '%s' cloned from snapshot %s of %s%s\n\n", nd, snap, dom,
               flatten ? " (flattened)" : "");
    }
    mgr_plan_free(plan);
    return 0;
}

static int cmd_reconcile(int argc, char **argv)
{
    static const struct option lo[] = {
        {"fix", no_argument, NULL, 'f'}, {"output", required_argument, NULL, 'O'}, {0}};
    bool fix = false, json = false;
    int c;
    while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        if (c == 'f') {
            fix = true;
        } else if (c == 'O') {
            if (!parse_output(optarg, &json)) {
                return EXIT_USAGE;
            }
        } else {
            return usage_error("reconcile", "reconcile DOM [--fix] [--output=json]");
        }
    }
    if (argc - optind != 1) {
        return usage_error("reconcile", "reconcile DOM [--fix] [--output=json]");
    }
    int rc = open_mgr(false, 0);
    if (rc) {
        return rc;
    }
    struct ct_err err = {0};
    struct mgr_finding *f = NULL;
    size_t n = 0;
    int r = mgr_reconcile(mgr, argv[optind], fix, &f, &n, &err);
    if (r < 0) {
        return fail(r, &err);
    }
    size_t open_ = 0;
    for (size_t i = 0; i < n; i++) {
        open_ += !f[i].fixed && !f[i].note;
    }
    if (json) {
        json_object *o = json_object_new_object();
        json_object *a = json_object_new_array();
        for (size_t i = 0; i < n; i++) {
            json_object *e = json_object_new_object();
            json_object_object_add(e, "path", jstr(f[i].path));
            json_object_object_add(e, "problem", jstr(f[i].what));
            json_object_object_add(e, "note", json_object_new_boolean(f[i].note));
            json_object_object_add(e, "fixable", json_object_new_boolean(f[i].fixable));
            json_object_object_add(e, "fixed", json_object_new_boolean(f[i].fixed));
            json_object_array_add(a, e);
        }
        json_object_object_add(o, "domain", jstr(argv[optind]));
        json_object_object_add(o, "findings", a);
        json_object_object_add(o, "unresolved", json_object_new_int64((int64_t)open_));
        print_json(o);
    } else {
        for (size_t i = 0; i < n; i++) {
            const char *kind = f[i].note      ? "note"
                               : f[i].fixed   ? "fixed"
                               : f[i].fixable ? "fixable"
                                              : "problem";
            if (f[i].path) {
                printf("%s: %s: %s\n", kind, f[i].path, f[i].what);
            } else {
                printf("%s: %s\n", kind, f[i].what);
            }
        }
        if (open_ == 0) {
            printf("Domain %s: catalog and files agree\n", argv[optind]);
        } else {
            printf("%zu finding(s), %zu unresolved\n", n, open_);
        }
    }
    mgr_findings_free(f, n);
    return open_ ? EXIT_MISMATCH : 0;
}

static int cmd_recover(int argc, char **argv)
{
    if (argc != 1) {
        return usage_error("recover", "recover");
    }
    int rc = open_mgr(true, 0);
    if (rc) {
        return rc;
    }
    struct ct_err err = {0};
    unsigned n = 0;
    int r = mgr_recover(mgr, &n, &err);
    if (r < 0) {
        return fail(r, &err);
    }
    printf("%u interrupted operation(s) finished\n", n);
    return 0;
}

/* ---- dispatch ---- */

static const struct {
    const char *name;
    int (*fn)(int argc, char **argv);
    const char *help;
} cmds[] = {
    {"define", cmd_define, "define NAME --disk TARGET=PATH... | define FILE.xml"},
    {"undefine", cmd_undefine, "undefine DOM [--snapshots-metadata] [--remove-all-storage]"},
    {"list", cmd_list, "list [--all | --inactive] [--name] [--output=json]"},
    {"start", cmd_start, "start DOM [--output=json]   (serve its disks over NBD via cowtreed)"},
    {"shutdown", cmd_shutdown, "shutdown DOM"},
    {"destroy", cmd_shutdown, "destroy DOM   (as shutdown: the disks are flushed and closed)"},
    {"domstate", cmd_domstate, "domstate DOM [--reason]"},
    {"dominfo", cmd_dominfo, "dominfo DOM [--output=json]"},
    {"domblklist", cmd_domblklist, "domblklist DOM [--details] [--output=json]"},
    {"images", cmd_images, "images DOM [--output=json]   (every file the catalog knows)"},
    {"snapshot-create-as", cmd_snapshot_create_as,
     "snapshot-create-as DOM [NAME [DESC]] [--disk-only] [--diskspec SPEC]... [--atomic] "
     "[--reuse-external] [--no-metadata] [--print-xml]"},
    {"snapshot-create", cmd_snapshot_create,
     "snapshot-create DOM [FILE.xml] [--redefine [--current]] [--disk-only] "
     "[--reuse-external] [--no-metadata]"},
    {"snapshot-list", cmd_snapshot_list,
     "snapshot-list DOM [--tree | --dot] [--parent] [--roots] [--leaves] [--no-leaves] "
     "[--current] [--internal] [--external] [--disk-only] [--from NAME [--descendants]] "
     "[--topological] [--name] [--output=json]"},
    {"snapshot-info", cmd_snapshot_info, "snapshot-info DOM {SNAP | --current} [--output=json]"},
    {"snapshot-current", cmd_snapshot_current, "snapshot-current DOM [--name] [SNAP]"},
    {"snapshot-parent", cmd_snapshot_parent, "snapshot-parent DOM {SNAP | --current}"},
    {"snapshot-dumpxml", cmd_snapshot_dumpxml, "snapshot-dumpxml DOM {SNAP | --current}"},
    {"snapshot-revert", cmd_snapshot_revert,
     "snapshot-revert DOM {SNAP | --current} [--force] [--dry-run] [--output=json]"},
    {"snapshot-delete", cmd_snapshot_delete,
     "snapshot-delete DOM {SNAP | --current} [--children | --children-only] [--metadata] "
     "[--dry-run] [--output=json]"},
    {"snapshot-protect", cmd_snapshot_protect, "snapshot-protect DOM {SNAP | --current}"},
    {"snapshot-unprotect", cmd_snapshot_unprotect, "snapshot-unprotect DOM {SNAP | --current}"},
    {"blockcommit", cmd_blockcommit,
     "blockcommit DOM DISK [--base PATH | --shallow] [--top PATH] [--active [--pivot | "
     "--keep-overlay]] [--delete] [--wait] [--timeout S] [--verbose] [--bandwidth MiB] "
     "[--dry-run] [--force]"},
    {"blockpull", cmd_blockpull,
     "blockpull DOM DISK [--base PATH] [--wait] [--timeout S] [--verbose] [--bandwidth MiB] "
     "[--dry-run]"},
    {"blockcopy", cmd_blockcopy,
     "blockcopy DOM DISK {DEST | --dest DEST} [--shallow] [--reuse-external] [--format "
     "raw|qcow2] [--pivot | --finish] [--wait] [--timeout S] [--verbose] [--bandwidth MiB] "
     "[--dry-run]"},
    {"blockjob", cmd_blockjob,
     "blockjob DOM DISK [--info] [--abort [--async]] [--pivot] [--bandwidth N [--bytes]]"},
    {"clone", cmd_clone, "clone DOM SNAPSHOT NEWDOM [--flatten]"},
    {"reconcile", cmd_reconcile, "reconcile DOM [--fix] [--output=json]"},
    {"recover", cmd_recover, "recover   (finish operations a killed cowtree left unfinished)"},
};

static void help(FILE *f)
{
    fprintf(f, "usage: cowtree COMMAND [ARGS...]\n\nCommands:\n");
    for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++) {
        fprintf(f, "  %s\n", cmds[i].help);
    }
    fprintf(f, "\nThe catalog lives in $COWTREE_HOME (default ~/.local/share/cowtree).\n"
               "Running domains are served by cowtreed (started by `start`) from "
               "$COWTREE_HOME/run;\nwhile a domain runs, snapshots and block jobs go through "
               "its QMP socket.\n"
               "Exit status: 0 ok, 1 error, 2 usage, 3 not found, 4 refused, 5 catalog and "
               "files disagree.\n");
}

int main(int argc, char **argv)
{
    cli_prog = "cowtree";
    if (argc < 2) {
        help(stderr);
        return EXIT_USAGE;
    }
    if (strcmp(argv[1], "--version") == 0 || strcmp(argv[1], "version") == 0) {
        printf("cowtree version %s\n", CT_VERSION_STRING);
        return 0;
    }
    if (strcmp(argv[1], "help") == 0 || strcmp(argv[1], "--help") == 0 ||
        strcmp(argv[1], "-h") == 0) {
        help(stdout);
        return 0;
    }
    cli_setup_faults();
    const char *k = getenv("COWTREE_MANAGER_KILL_AT_STEP");
    if (k && *k) {
        kill_at = strtoul(k, NULL, 10);
    }
    for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++) {
        if (strcmp(argv[1], cmds[i].name) == 0) {
            optind = 1;
            int rc = cmds[i].fn(argc - 1, argv + 1);
            mgr_close(mgr);
            return rc;
        }
    }
    cli_error("error: unknown command: '%s' (see cowtree help)", argv[1]);
    return EXIT_USAGE;
}
