/*
 * cowtree-img commit: qemu-img commit (offline virsh blockcommit).
 *
 *   commit [-f FMT] [-b BASE] [-d] [-p] [-q] [-r RATE] [-t CACHE] TOP [--rebase-overlays IMG...]
 *
 * Merges TOP and every image between TOP and BASE (default: TOP's backing file) into BASE,
 * copying only what those layers allocate. TOP is emptied afterwards unless -d (-b implies -d,
 * as in qemu-img 7.2). --rebase-overlays points the listed images, whose backing file must be
 * TOP (checked before anything changes), at BASE once the data is in BASE (the first method of
 * deleting an external snapshot: commit, then unsafe rebase of its overlays).
 *
 * Opening: the chain is first read without locks to learn its layers; then each committed
 * layer is opened on its own without its backing file (read-only, or writable for the top when
 * it is emptied), and BASE is opened writable with its own chain below. A backing layer cannot
 * be made writable inside an open chain with the current API (see the lead's notes).
 */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli-util.h"
#include "cli/img-chain.h"
#include "cli/img.h"
#include "job/job.h"

#define USAGE                                                                                      \
    "usage: commit [-f FMT] [-b BASE] [-d] [-p] [-q] [-r RATE] TOP [--rebase-overlays IMG...]"

struct layer_desc {
    char *path, *fmt;
};

static void close_all(struct ct_image **imgs, unsigned n)
{
    for (unsigned i = 0; i < n; i++) {
        ct_image_close(imgs[i], NULL);
        imgs[i] = NULL;
    }
}

int img_commit(int argc, char **argv)
{
    const char *fmt = NULL, *base_name = NULL;
    bool keep = false, progress = false, quiet = false;
    unsigned cache_flags = 0; /* -t: how the images written are written */
    uint64_t rate = 0;
    int ret = 1;
    /* "--rebase-overlays A B ..." takes every following non-option word. */
    char **args = calloc((size_t)argc + 1, sizeof(*args));
    const char **ovnames = calloc((size_t)argc + 1, sizeof(*ovnames));
    if (!args || !ovnames) {
        cli_error("out of memory");
        free(args);
        free(ovnames);
        return 1;
    }
    int nargs = 0;
    unsigned nov = 0;
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--rebase-overlays")) {
            while (i + 1 < argc && argv[i + 1][0] != '-') {
                ovnames[nov++] = argv[++i];
            }
            if (nov == 0) {
                cli_error("--rebase-overlays needs at least one image");
                goto out_args;
            }
        } else if (!strncmp(argv[i], "--rebase-overlays=", 18)) {
            ovnames[nov++] = argv[i] + 18;
        } else {
            args[nargs++] = argv[i];
        }
    }
    static const struct option lo[] = {{"help", no_argument, NULL, 'h'}, {0}};
    int c;
    optind = 1;
    while ((c = getopt_long(nargs, args, "+f:b:dpqr:t:h", lo, NULL)) != -1) {
        switch (c) {
        case 'f':
            fmt = optarg;
            break;
        case 'b':
            base_name = optarg;
            break;
        case 'd':
            keep = true;
            break;
        case 'p':
            progress = true;
            break;
        case 'q':
            quiet = true;
            break;
        case 't':
            if (cli_cache_flags(optarg, &cache_flags) < 0) {
                goto out_args;
            }
            break;
        case 'r':
            if (cli_parse_size(optarg, &rate) < 0 || rate == 0) {
                cli_error("Invalid rate limit '%s'", optarg);
                goto out_args;
            }
            break;
        default:
            cli_error(USAGE);
            goto out_args;
        }
    }
    if (optind != nargs - 1) {
        cli_error(optind >= nargs ? "Expecting one image file name" : USAGE);
        goto out_args;
    }
    if (quiet) {
        progress = false;
    }
    if (base_name) {
        keep = true; /* qemu-img 7.2: -b implies -d */
    }
    const char *top = args[optind];

    /* 1. Learn the chain (no locks: nothing is read but headers). */
    struct ct_err err = {0};
    struct ct_image *probe = NULL;
    struct ct_open_opts po = {.format = fmt, .flags = CT_OPEN_FORCE_SHARE};
    if (ct_image_open(&probe, top, &po, &err) < 0) {
        cli_error_err(top, &err);
        goto out_args;
    }
    if (!ct_image_backing(probe)) {
        cli_error("%s: Image does not have a backing file", top);
        ct_image_close(probe, NULL);
        goto out_args;
    }
    int base_depth = 1;
    if (base_name) {
        base_depth = chain_find_layer(probe, base_name);
        if (base_depth < 0) {
            cli_error("%s: Did not find '%s' in the backing chain of '%s'", top, base_name, top);
            ct_image_close(probe, NULL);
            goto out_args;
        }
    }
    unsigned n = (unsigned)base_depth; /* committed layers: depth 0 .. base_depth-1 */
    struct layer_desc *desc = calloc(n + 1, sizeof(*desc));
    char *link_pref = NULL;
    struct ct_image *l = probe;
    for (unsigned i = 0; desc && i <= n; i++, l = ct_image_backing(l)) {
        desc[i].path = strdup(ct_image_filename(l));
        desc[i].fmt = strdup(ct_image_format(l));
        if (i == n - 1) {
            struct ct_image_info info;
            if (ct_image_info(l, &info) == 0 && info.backing_file) {
                link_pref = strdup(info.backing_file);
            }
        }
    }
    ct_image_close(probe, NULL);

    struct ct_image **layers = calloc(n, sizeof(*layers));
    struct ct_image **ovs = calloc(nov + 1, sizeof(*ovs));
    struct ct_image *base = NULL;
    char *link = NULL;
    if (!desc || !layers || !ovs) {
        cli_error("out of memory");
        goto out;
    }

    /* 2. Overlays to rebase: must have TOP as their backing file. */
    for (unsigned i = 0; i < nov; i++) {
        ovs[i] = img_open(ovnames[i], NULL, CT_OPEN_WRITE | CT_OPEN_NO_BACKING | cache_flags);
        if (!ovs[i]) {
            goto out;
        }
        struct ct_image_info info;
        if (ct_image_info(ovs[i], &info) < 0 || !info.full_backing_file ||
            !chain_same_file(info.full_backing_file, top)) {
            cli_error("%s: its backing file is not '%s'; refusing to rebase it onto the base",
                      ovnames[i], top);
            goto out;
        }
        if (chain_same_file(ovnames[i], top)) {
            cli_error("%s: an overlay cannot be the image being committed", ovnames[i]);
            goto out;
        }
    }

    /* 3. The committed layers, each without its backing file; then the base, writable. */
    for (unsigned i = 0; i < n; i++) {
        unsigned flags = CT_OPEN_NO_BACKING | (i == 0 && !keep ? CT_OPEN_WRITE | cache_flags : 0);
        layers[i] = img_open(desc[i].path, desc[i].fmt, flags);
        if (!layers[i]) {
            goto out;
        }
    }
    if (!keep && strcmp(desc[0].fmt, "qcow2") != 0) {
        cli_error("%s: cannot empty a %s image after the commit (use -d)", top, desc[0].fmt);
        goto out;
    }
    base = img_open(desc[n].path, desc[n].fmt, CT_OPEN_WRITE | cache_flags);
    if (!base) {
        goto out;
    }
    if (nov) {
        link = chain_link_for(ovnames[0], desc[n].path, link_pref);
        for (unsigned i = 1; link && i < nov; i++) {
            char *p = chain_resolve(ovnames[i], link);
            bool same = p && chain_same_file(p, desc[n].path);
            free(p);
            if (!same) {
                /* Overlays in different directories: an absolute link suits them all. */
                free(link);
                link = realpath(desc[n].path, NULL);
                break;
            }
        }
        if (!link) {
            cli_error("out of memory");
            goto out;
        }
    }

    /* 4. Run. */
    struct chain_runner runner;
    struct ct_job_opts jo;
    chain_job_opts(&jo, &runner, progress, rate);
    struct ct_commit_opts co = {
        .layers = layers,
        .nb_layers = n,
        .base = base,
        .empty_top = !keep,
        .overlays = ovs,
        .nb_overlays = nov,
        .overlay_backing = link,
        .overlay_backing_fmt = desc[n].fmt,
    };
    struct ct_job *job;
    if (ct_job_commit_create(&job, &co, &jo, &err) < 0) {
        cli_error_err(top, &err);
        goto out;
    }
    ret = chain_run_job(job, &runner, top);

out:
    if (layers) {
        close_all(layers, n);
    }
    if (ovs) {
        close_all(ovs, nov);
    }
    if (base && ct_image_close(base, &err) < 0) {
        cli_error_err(desc[n].path, &err);
        ret = 1;
    }
    if (ret == 0 && !quiet) {
        printf("Image committed.\n");
    }
    for (unsigned i = 0; desc && i <= n; i++) {
        free(desc[i].path);
        free(desc[i].fmt);
    }
    free(desc);
    free(layers);
    free(ovs);
    free(link);
    free(link_pref);
out_args:
    free(args);
    free(ovnames);
    return ret;
}
