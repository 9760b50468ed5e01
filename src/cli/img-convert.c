/*
 * cowtree-img convert: qemu-img convert.
 *
 *   convert [-f FMT] [-O FMT] [-B BACKING -F FMT] [-c] [-o OPTS] [-p] [-q] [-n] [-S SIZE] [-W]
 *           [-m N] [-r RATE] [-t CACHE] [-T CACHE] [-C] [-U]
 *           [-l snapshot.name=NAME | -l snapshot.id=ID | -l NAME | -s NAME] [--target-is-zero]
 *           SRC... DST
 *
 * Copies the guest view of the sources (concatenated) into DST, flattened and sparse: zero
 * regions are skipped, and runs of at least SIZE zero bytes (-S, default 4k; 0 = write
 * everything) inside data are not written. -B makes DST an overlay of BACKING holding only what
 * differs from it (compared by content where BACKING is not the source's own backing file).
 * -n writes into an existing DST (whose zeros must then be written, unless --target-is-zero);
 * without -O its format is probed rather than taken as raw. -c stores data clusters compressed
 * (zlib or zstd, per the target's compression_type), qcow2 targets only.
 *
 * -m N (1..16, default 8 as qemu-img) copies with up to N threads, each reading through its
 * own read-only handles of the sources (open_src: an image handle is not thread-safe; several
 * read-only opens of one file take compatible locks). A raw target is written by the threads
 * directly; a qcow2 target by one writer in guest order, or as chunks complete with -W
 * (src/job/copy.c, "Parallel copy"). -c and -B copy one request at a time. -C (copy
 * offloading) copies raw-to-raw data with copy_file_range and never looks for zeros inside
 * data; it is refused with -c and with -S, as qemu-img does.
 */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/cli-util.h"
#include "cli/img-chain.h"
#include "cli/img.h"
#include "job/job.h"

#define USAGE                                                                                      \
    "usage: convert [-f FMT] [-O FMT] [-B BACKING -F FMT] [-o OPTS] [-p] [-q] [-n] [-S SIZE] "     \
    "[-W] [-m N] [-C] [-l SNAPSHOT_PARAM] [--target-is-zero] SRC... DST"

enum { OPT_TARGET_IS_ZERO = 256, OPT_OBJECT, OPT_UNSUPPORTED };

/* How a copy thread opens its own read-only handle of source i (job open_src callback). */
struct src_open {
    char **paths;
    struct ct_open_opts opts;
};

static int open_src(void *opaque, unsigned i, struct ct_image **out, struct ct_err *err)
{
    const struct src_open *so = opaque;
    return ct_image_open(out, so->paths[i], &so->opts, err);
}

int img_convert(int argc, char **argv)
{
    const char *fmt = NULL, *out_fmt = NULL, *backing = NULL, *bfmt = NULL, *snap = NULL;
    char *optstr = NULL;
    bool progress = false, quiet = false, no_create = false, target_zero = false,
         force_share = false;
    uint64_t min_sparse = 4096, rate = 0;
    bool compress = false, out_of_order = false, copy_offload = false, sparse_given = false;
    unsigned nb_workers = 8;
    unsigned cache_flags = 0; /* -t: how the target is written */
    static const struct option lo[] = {
        {"help", no_argument, NULL, 'h'},
        {"target-is-zero", no_argument, NULL, OPT_TARGET_IS_ZERO},
        {"force-share", no_argument, NULL, 'U'},
        {"object", required_argument, NULL, OPT_OBJECT},
        {"image-opts", no_argument, NULL, OPT_UNSUPPORTED},
        {"target-image-opts", no_argument, NULL, OPT_UNSUPPORTED},
        {"salvage", no_argument, NULL, OPT_UNSUPPORTED},
        {"bitmaps", no_argument, NULL, OPT_UNSUPPORTED},
        {0},
    };
    int c, ret = 1;
    while ((c = getopt_long(argc, argv, "+f:O:B:F:co:pqnS:Wm:r:l:s:t:T:CUh", lo, NULL)) != -1) {
        switch (c) {
        case 'f':
            fmt = optarg;
            break;
        case 'O':
            out_fmt = optarg;
            break;
        case 'B':
            backing = optarg;
            break;
        case 'F':
            bfmt = optarg;
            break;
        case 'p':
            progress = true;
            break;
        case 'q':
            quiet = true;
            break;
        case 'n':
            no_create = true;
            break;
        case 'W':
            out_of_order = true;
            break;
        case 'C':
            copy_offload = true;
            break;
        case 't':
            if (cli_cache_flags(optarg, &cache_flags) < 0) {
                goto out;
            }
            break;
        case 'T': {
            unsigned unused; /* sources are only read: any mode reads the same bytes */
            if (cli_cache_flags(optarg, &unused) < 0) {
                goto out;
            }
            break;
        }
        case 'U':
            force_share = true;
            break;
        case OPT_OBJECT:
            break;
        case OPT_TARGET_IS_ZERO:
            target_zero = true;
            break;
        case 'c':
            compress = true;
            break;
        case 'o': {
            char *n = NULL;
            if (optstr) {
                if (asprintf(&n, "%s,%s", optstr, optarg) < 0) {
                    n = NULL;
                }
            } else {
                n = strdup(optarg);
            }
            free(optstr);
            optstr = n;
            if (!optstr) {
                cli_error("out of memory");
                goto out;
            }
            break;
        }
        case 'S':
            if (cli_parse_size(optarg, &min_sparse) < 0 || min_sparse % 512 ||
                min_sparse > (16u << 20)) {
                cli_error("Invalid buffer size for sparse output specified. Valid sizes are "
                          "multiples of 512 up to 16777216.");
                goto out;
            }
            sparse_given = true;
            break;
        case 'm': {
            char *end;
            long m = strtol(optarg, &end, 10);
            if (*end || m < 1 || m > 16) {
                cli_error("Invalid number of coroutines. Allowed number of coroutines is between "
                          "1 and 16");
                goto out;
            }
            nb_workers = (unsigned)m;
            break;
        }
        case 'r':
            if (cli_parse_size(optarg, &rate) < 0 || rate == 0) {
                cli_error("Invalid rate limit '%s'", optarg);
                goto out;
            }
            break;
        case 'l':
            snap = chain_snapshot_param(optarg);
            if (!snap) {
                cli_error("Invalid snapshot parameter '%s' (use snapshot.name=NAME, "
                          "snapshot.id=ID or NAME)",
                          optarg);
                goto out;
            }
            break;
        case 's':
            snap = optarg;
            break;
        case OPT_UNSUPPORTED:
            cli_error("option '%s' is not supported", argv[optind - 1]);
            goto out;
        default:
            cli_error(USAGE);
            goto out;
        }
    }
    if (quiet) {
        progress = false;
    }
    if (copy_offload && compress) {
        cli_error("Cannot enable copy offloading when -c is used");
        goto out;
    }
    if (copy_offload && sparse_given) {
        cli_error("Cannot enable copy offloading when -S is used");
        goto out;
    }
    int nsrc = argc - optind - 1;
    if (nsrc < 1) {
        cli_error("Must specify image file name");
        goto out;
    }
    const char *dst_path = argv[argc - 1];
    /* -n without -O: the existing target's format is probed (qemu-img would take it as raw and
     * overwrite a qcow2 target's metadata with guest data). */
    const char *open_fmt = out_fmt;
    if (!out_fmt) {
        out_fmt = "raw";
    }
    struct ct_create_opts co = {.format = out_fmt};
    if (optstr && chain_parse_create_opts(optstr, &co, false) < 0) {
        goto out;
    }
    if (co.backing_file) {
        if (backing) {
            cli_error("-B and -o backing_file cannot be used together");
            goto out;
        }
        backing = co.backing_file;
        bfmt = bfmt ? bfmt : co.backing_format;
    }
    if (!no_create) {
        open_fmt = out_fmt;
    }
    if (compress && strcmp(out_fmt, "qcow2") != 0) {
        cli_error("Compression not supported for this file format ('%s')", out_fmt);
        goto out;
    }
    if (strcmp(out_fmt, "qcow2") && strcmp(out_fmt, "raw")) {
        cli_error("Unknown file format '%s'", out_fmt);
        goto out;
    }
    if (backing && strcmp(out_fmt, "qcow2")) {
        cli_error("Backing file not supported for file format '%s'", out_fmt);
        goto out;
    }
    if (backing && !bfmt) {
        cli_error("%s: Backing file specified without backing format (use -F FMT)", dst_path);
        goto out;
    }
    if (backing && no_create) {
        cli_error("-B cannot be used with -n");
        goto out;
    }
    if (target_zero && (!no_create || backing)) {
        cli_error(!no_create ? "--target-is-zero requires use of -n flag"
                             : "--target-is-zero cannot be used with a backing file");
        goto out;
    }
    if (snap && nsrc > 1) {
        cli_error("No support for concatenating multiple snapshot");
        goto out;
    }

    struct ct_image **srcs = calloc((size_t)nsrc, sizeof(*srcs));
    struct ct_image *dst = NULL;
    struct ct_err err = {0};
    if (compress || backing) {
        nb_workers = 1;
    }
    struct src_open so = {
        .paths = argv + optind,
        .opts = {.format = fmt, .flags = force_share ? CT_OPEN_FORCE_SHARE : 0, .snapshot = snap},
    };
    if (!srcs) {
        cli_error("out of memory");
        goto out;
    }
    uint64_t total = 0;
    for (int i = 0; i < nsrc; i++) {
        const char *p = argv[optind + i];
        struct ct_open_opts o = {
            .format = fmt, .flags = force_share ? CT_OPEN_FORCE_SHARE : 0, .snapshot = snap};
        if (ct_image_open(&srcs[i], p, &o, &err) < 0) {
            cli_error_err(p, &err);
            goto out_imgs;
        }
        total += ct_image_size(srcs[i]);
    }
    if (!no_create) {
        co.size = total;
        co.size_given = true;
        co.backing_file = backing;
        co.backing_format = backing ? bfmt : NULL;
        if (ct_image_create(dst_path, &co, &err) < 0) {
            cli_error_err(dst_path, &err);
            /* A half-created target is no image: do not leave it behind. */
            unlink(dst_path);
            goto out_imgs;
        }
    }
    dst = img_open(dst_path, open_fmt,
                   CT_OPEN_WRITE | cache_flags | (backing ? 0 : CT_OPEN_NO_BACKING));
    if (!dst) {
        goto out_imgs;
    }
    struct chain_runner runner;
    struct ct_job_opts jo;
    chain_job_opts(&jo, &runner, progress, rate);
    jo.buf_bytes = min_sparse * 2 > (2u << 20) ? min_sparse * 2 : 0;
    struct ct_copy_opts cpo = {
        .srcs = srcs,
        .nb_srcs = (unsigned)nsrc,
        .dst = dst,
        .dst_is_zero = (!no_create || target_zero) && min_sparse != 0,
        .min_sparse = min_sparse,
        .compress = compress,
        .nb_workers = nb_workers,
        .open_src = open_src,
        .open_opaque = &so,
        .out_of_order = out_of_order,
        .copy_offload = copy_offload,
    };
    struct ct_job *job;
    if (ct_job_copy_create(&job, &cpo, &jo, &err) < 0) {
        cli_error_err(dst_path, &err);
        goto out_imgs;
    }
    ret = chain_run_job(job, &runner, dst_path);
out_imgs:
    if (dst && ct_image_close(dst, &err) < 0 && ret == 0) {
        cli_error_err(dst_path, &err);
        ret = 1;
    }
    for (int i = 0; i < nsrc; i++) {
        ct_image_close(srcs[i], NULL);
    }
    free(srcs);
out:
    free(optstr);
    return ret;
}
