/*
 * Helpers shared by the chain verbs: -o parsing, backing-link strings, finding a layer of a
 * chain by name, and running a job with progress and Ctrl-C.
 */
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli/cli-util.h"
#include "cli/img-chain.h"
#include "job/job.h"

int chain_parse_create_opts(char *s, struct ct_create_opts *o, bool lenient)
{
    char *save = NULL;
    for (char *kv = strtok_r(s, ",", &save); kv; kv = strtok_r(NULL, ",", &save)) {
        char *v = strchr(kv, '=');
        if (!v) {
            cli_error("Invalid option '%s': expected key=value", kv);
            return -1;
        }
        *v++ = '\0';
        uint64_t n;
        bool on = !strcmp(v, "on") || !strcmp(v, "true");
        bool off = !strcmp(v, "off") || !strcmp(v, "false");
        if (!strcmp(kv, "cluster_size")) {
            if (cli_parse_size(v, &n) < 0 || n < 512 || n > (2u << 20) || (n & (n - 1))) {
                cli_error("Cluster size must be a power of two between 512 and 2048k");
                return -1;
            }
            o->cluster_size = (unsigned)n;
        } else if (!strcmp(kv, "compat")) {
            if (!strcmp(v, "0.10") || !strcmp(v, "v2")) {
                o->compat = 2;
            } else if (!strcmp(v, "1.1") || !strcmp(v, "v3")) {
                o->compat = 3;
            } else {
                cli_error("Invalid compat '%s' (use 0.10, 1.1, v2 or v3)", v);
                return -1;
            }
        } else if (!strcmp(kv, "refcount_bits")) {
            if (cli_parse_size(v, &n) < 0 || n == 0 || n > 64 || (n & (n - 1))) {
                cli_error("Refcount width must be a power of two and may not exceed 64 bits");
                return -1;
            }
            o->refcount_bits = (unsigned)n;
        } else if (!strcmp(kv, "lazy_refcounts") || !strcmp(kv, "extended_l2")) {
            if (!on && !off) {
                cli_error("Invalid value '%s' for %s (use on or off)", v, kv);
                return -1;
            }
            if (kv[0] == 'l') {
                o->lazy_refcounts = on;
            } else {
                o->extended_l2 = on;
            }
        } else if (!strcmp(kv, "compression_type")) {
            if (!strcmp(v, "zlib")) {
                o->compression_type = 0;
            } else if (!strcmp(v, "zstd")) {
                o->compression_type = 1;
            } else {
                cli_error("Invalid compression_type '%s' (use zlib or zstd)", v);
                return -1;
            }
        } else if (!strcmp(kv, "preallocation")) {
            static const char *const modes[] = {"off", "metadata", "falloc", "full"};
            unsigned i = 0;
            while (i < 4 && strcmp(v, modes[i])) {
                i++;
            }
            if (i == 4) {
                cli_error("Invalid preallocation '%s' (off, metadata, falloc, full)", v);
                return -1;
            }
            o->prealloc = (enum ct_prealloc)i;
        } else if (!strcmp(kv, "backing_file")) {
            o->backing_file = v;
        } else if (!strcmp(kv, "backing_fmt")) {
            o->backing_format = v;
        } else if (!strcmp(kv, "size")) {
            if (cli_parse_size(v, &o->size) < 0) {
                cli_error("Invalid size '%s'", v);
                return -1;
            }
            o->size_given = true;
        } else if (!lenient) {
            cli_error("Invalid parameter '%s'", kv);
            return -1;
        }
    }
    return 0;
}

char *chain_resolve(const char *overlay, const char *name)
{
    if (name[0] == '/') {
        return strdup(name);
    }
    const char *slash = strrchr(overlay, '/');
    if (!slash) {
        return strdup(name);
    }
    char *out = NULL;
    if (asprintf(&out, "%.*s/%s", (int)(slash - overlay), overlay, name) < 0) {
        return NULL;
    }
    return out;
}

bool chain_same_file(const char *a, const char *b)
{
    struct stat sa, sb;
    if (stat(a, &sa) < 0 || stat(b, &sb) < 0) {
        return false;
    }
    return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

static bool leads_to(const char *overlay, const char *name, const char *target)
{
    char *p = chain_resolve(overlay, name);
    bool ok = p && chain_same_file(p, target);
    free(p);
    return ok;
}

/* Path of target relative to directory dir (both absolute, canonical). Owned. */
static char *relative_path(const char *dir, const char *target)
{
    size_t common = 0, i = 0;
    /* Longest common prefix ending at a component boundary. */
    while (dir[i] && target[i] && dir[i] == target[i]) {
        i++;
        if (dir[i] == '\0' || dir[i] == '/') {
            if (target[i] == '/' || target[i] == '\0') {
                common = i;
            }
        }
    }
    if (!strcmp(dir, "/")) {
        common = 0;
    }
    size_t ups = 0;
    for (const char *p = dir + common; *p; p++) {
        if (*p == '/' && p[1] && p[1] != '/') {
            ups++;
        }
    }
    const char *rest = target + common;
    while (*rest == '/') {
        rest++;
    }
    size_t len = ups * 3 + strlen(rest) + 1;
    char *out = malloc(len);
    if (!out) {
        return NULL;
    }
    out[0] = '\0';
    for (size_t k = 0; k < ups; k++) {
        strcat(out, "../");
    }
    strcat(out, rest);
    return out;
}

char *chain_link_for(const char *overlay, const char *target, const char *preferred)
{
    if (preferred && *preferred && leads_to(overlay, preferred, target)) {
        return strdup(preferred);
    }
    char ov[PATH_MAX], tg[PATH_MAX];
    if (!realpath(overlay, ov) || !realpath(target, tg)) {
        return strdup(target);
    }
    char *slash = strrchr(ov, '/');
    if (slash == ov) {
        slash[1] = '\0';
    } else if (slash) {
        *slash = '\0';
    }
    char *rel = relative_path(ov, tg);
    if (rel && *rel && leads_to(overlay, rel, target)) {
        return rel;
    }
    free(rel);
    return strdup(tg);
}

int chain_find_layer(struct ct_image *top, const char *name)
{
    int depth = 0;
    for (struct ct_image *l = top, *b; (b = ct_image_backing(l)); l = b) {
        depth++;
        struct ct_image_info info;
        if (ct_image_info(l, &info) == 0 && info.backing_file && !strcmp(info.backing_file, name)) {
            return depth;
        }
        if (chain_same_file(name, ct_image_filename(b))) {
            return depth;
        }
    }
    return -1;
}

const char *chain_snapshot_param(const char *s)
{
    if (!strncmp(s, "snapshot.name=", 14)) {
        return s + 14;
    }
    if (!strncmp(s, "snapshot.id=", 12)) {
        return s + 12;
    }
    if (strchr(s, '=')) {
        return NULL;
    }
    return s;
}

/* ---- running a job ---- */

static volatile sig_atomic_t interrupted;

static void on_sigint(int sig)
{
    (void)sig;
    interrupted = 1;
}

static void on_progress(struct ct_job *job, void *opaque)
{
    struct chain_runner *r = opaque;
    if (interrupted) {
        ct_job_cancel(job, true, NULL);
    }
    uint64_t done, total;
    ct_job_progress(job, &done, &total);
    cli_progress_update(&r->progress, done, total);
}

void chain_job_opts(struct ct_job_opts *jo, struct chain_runner *r, bool progress, uint64_t speed)
{
    memset(jo, 0, sizeof(*jo));
    memset(r, 0, sizeof(*r));
    r->progress.on = progress;
    jo->speed = speed;
    jo->progress = on_progress;
    jo->opaque = r;
}

int chain_run_job(struct ct_job *job, struct chain_runner *r, const char *file)
{
    struct sigaction sa = {.sa_handler = on_sigint}, old_int, old_term;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &old_int);
    sigaction(SIGTERM, &sa, &old_term);
    cli_progress_init(&r->progress, r->progress.on);
    struct ct_err err = {0};
    int ret = ct_job_run(job, &err);
    if (ret == 0) {
        uint64_t done, total;
        ct_job_progress(job, &done, &total);
        cli_progress_update(&r->progress, total, total);
    }
    cli_progress_end(&r->progress);
    sigaction(SIGINT, &old_int, NULL);
    sigaction(SIGTERM, &old_term, NULL);
    ct_job_free(job);
    if (ret < 0) {
        if (ret == -ECANCELED) {
            cli_error("%s: the %s was cancelled; the images are unchanged as seen from the top",
                      file, "operation");
        } else {
            /* Job messages name the image they are about (it need not be FILE). */
            cli_error_err(NULL, &err);
        }
        return 1;
    }
    return 0;
}
