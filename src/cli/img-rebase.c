/*
 * cowtree-img rebase: qemu-img rebase.
 *
 *   rebase [-f FMT] [-t CACHE] [-T CACHE] [-p] [-q] [-u] -b BACKING [-F FMT] FILE
 *
 * -u (unsafe) rewrites only the backing link. The default (safe) mode first copies into FILE
 * the data that differs between its old and its new backing chain, in clusters FILE does not
 * allocate itself, so that FILE reads the same afterwards; only regions allocated above the
 * chains' common ancestor are compared (see src/job/rebase.c). -b "" makes FILE standalone.
 * A relative BACKING is relative to FILE's directory, as in qemu-img; it is stored as given.
 * -c (QEMU 8.2) writes the clusters the safe mode copies into FILE compressed; clusters FILE
 * allocated before stay as they are; refused with -u (nothing is copied).
 */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli-util.h"
#include "cli/img-chain.h"
#include "cli/img.h"
#include "job/job.h"

#define USAGE "usage: rebase [-f FMT] [-u] [-c] -b BACKING [-F FMT] [-p] [-q] FILE"

int img_rebase(int argc, char **argv)
{
    const char *fmt = NULL, *backing = NULL, *bfmt = NULL;
    bool unsafe = false, progress = false, quiet = false, compress = false;
    unsigned cache_flags = 0;
    static const struct option lo[] = {{"help", no_argument, NULL, 'h'},
                                       {"force-share", no_argument, NULL, 'U'},
                                       {"compress", no_argument, NULL, 'c'},
                                       {0}};
    int c;
    while ((c = getopt_long(argc, argv, "+f:b:F:upqt:T:ch", lo, NULL)) != -1) {
        switch (c) {
        case 'f':
            fmt = optarg;
            break;
        case 'b':
            backing = optarg;
            break;
        case 'F':
            bfmt = optarg;
            break;
        case 'u':
            unsafe = true;
            break;
        case 'p':
            progress = true;
            break;
        case 'q':
            quiet = true;
            break;
        case 't':
            if (cli_cache_flags(optarg, &cache_flags) < 0) {
                return 1;
            }
            break;
        case 'T': {
            unsigned unused; /* backing files are only read */
            if (cli_cache_flags(optarg, &unused) < 0) {
                return 1;
            }
            break;
        }
        case 'c':
            compress = true;
            break;
        default:
            cli_error(USAGE);
            return 1;
        }
    }
    if (optind != argc - 1) {
        cli_error("Expecting one image file name");
        return 1;
    }
    if (!backing) {
        cli_error("Must specify backing file (-b)");
        return 1;
    }
    if (quiet) {
        progress = false;
    }
    if (compress && unsafe) {
        cli_error("Cannot use compression in unsafe mode (-c with -u)");
        return 1;
    }
    const char *file = argv[optind];
    bool none = *backing == '\0';
    if (!none && !bfmt) {
        cli_error("%s: backing format must be specified (use -F FMT)", file);
        return 1;
    }
    if (!none && strcmp(bfmt, "qcow2") && strcmp(bfmt, "raw")) {
        cli_error("%s: Unknown backing format '%s'", file, bfmt);
        return 1;
    }
    struct ct_err err = {0};
    if (unsafe) {
        struct ct_image *img =
            img_open(file, fmt, CT_OPEN_WRITE | CT_OPEN_NO_BACKING | cache_flags);
        if (!img) {
            return 1;
        }
        int r = ct_image_change_backing(img, none ? NULL : backing, none ? NULL : bfmt, &err);
        if (r < 0) {
            cli_error_err(file, &err);
            ct_image_close(img, NULL);
            return 1;
        }
        if (ct_image_close(img, &err) < 0) {
            cli_error_err(file, &err);
            return 1;
        }
        return 0;
    }

    struct ct_image *img = img_open(file, fmt, CT_OPEN_WRITE | cache_flags);
    if (!img) {
        return 1;
    }
    if (strcmp(ct_image_format(img), "qcow2") != 0) {
        cli_error("%s: only qcow2 images have a backing file", file);
        ct_image_close(img, NULL);
        return 1;
    }
    struct ct_image *nb = NULL;
    int ret = 1;
    if (!none) {
        char *path = chain_resolve(file, backing);
        struct ct_open_opts o = {.format = bfmt};
        if (!path) {
            cli_error("out of memory");
            goto out;
        }
        if (ct_image_open(&nb, path, &o, &err) < 0) {
            cli_error("%s: Could not open new backing file '%s': %s", file, path, err.msg);
            free(path);
            goto out;
        }
        free(path);
    }
    struct chain_runner runner;
    struct ct_job_opts jo;
    chain_job_opts(&jo, &runner, progress, 0);
    struct ct_rebase_opts ro = {
        .img = img,
        .new_backing = nb,
        .backing = none ? NULL : backing,
        .backing_fmt = none ? NULL : bfmt,
        .compress = compress,
    };
    struct ct_job *job;
    if (ct_job_rebase_create(&job, &ro, &jo, &err) < 0) {
        cli_error_err(file, &err);
        goto out;
    }
    ret = chain_run_job(job, &runner, file);
out:
    ct_image_close(nb, NULL);
    if (ct_image_close(img, &err) < 0 && ret == 0) {
        cli_error_err(file, &err);
        ret = 1;
    }
    return ret;
}
