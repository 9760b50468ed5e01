/*
 * cowtree-img pull: offline virsh blockpull (QEMU block-stream).
 *
 *   pull [-f FMT] [-b BASE] [-p] [-q] [-r RATE] FILE
 *
 * Copies into FILE everything its backing chain provides above BASE (everything, without
 * -b), then makes BASE its backing file (none, without -b): Figure-5 and Figure-6 of the
 * blockcommit/blockpull notes. BASE is named as a path (same file) or as the link string the
 * chain stores for it. The images between FILE and BASE are left as they are.
 */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli-util.h"
#include "cli/img-chain.h"
#include "cli/img.h"
#include "job/job.h"

#define USAGE "usage: pull [-f FMT] [-b BASE] [-p] [-q] [-r RATE] FILE"

int img_pull(int argc, char **argv)
{
    const char *fmt = NULL, *base_name = NULL;
    bool progress = false, quiet = false;
    uint64_t rate = 0;
    static const struct option lo[] = {{"help", no_argument, NULL, 'h'}, {0}};
    int c;
    while ((c = getopt_long(argc, argv, "+f:b:pqr:h", lo, NULL)) != -1) {
        switch (c) {
        case 'f':
            fmt = optarg;
            break;
        case 'b':
            base_name = optarg;
            break;
        case 'p':
            progress = true;
            break;
        case 'q':
            quiet = true;
            break;
        case 'r':
            if (cli_parse_size(optarg, &rate) < 0 || rate == 0) {
                cli_error("Invalid rate limit '%s'", optarg);
                return 1;
            }
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
    if (quiet) {
        progress = false;
    }
    const char *file = argv[optind];
    struct ct_image *img = img_open(file, fmt, CT_OPEN_WRITE);
    if (!img) {
        return 1;
    }
    int ret = 1;
    struct ct_err err = {0};
    struct ct_image *base = NULL;
    char *link = NULL;
    const char *bfmt = NULL;
    if (base_name) {
        int depth = chain_find_layer(img, base_name);
        if (depth < 0) {
            cli_error("%s: Did not find '%s' in the backing chain of '%s'", file, base_name, file);
            goto out;
        }
        struct ct_image *above = img;
        for (int i = 1; i < depth; i++) {
            above = ct_image_backing(above);
        }
        base = ct_image_backing(above);
        struct ct_image_info info;
        const char *pref = ct_image_info(above, &info) == 0 ? info.backing_file : NULL;
        link = chain_link_for(file, ct_image_filename(base), pref);
        if (!link) {
            cli_error("out of memory");
            goto out;
        }
        bfmt = ct_image_format(base);
    }
    struct chain_runner runner;
    struct ct_job_opts jo;
    chain_job_opts(&jo, &runner, progress, rate);
    struct ct_stream_opts so = {.img = img, .base = base, .backing = link, .backing_fmt = bfmt};
    struct ct_job *job;
    if (ct_job_stream_create(&job, &so, &jo, &err) < 0) {
        cli_error_err(file, &err);
        goto out;
    }
    ret = chain_run_job(job, &runner, file);
out:
    free(link);
    if (ct_image_close(img, &err) < 0 && ret == 0) {
        cli_error_err(file, &err);
        ret = 1;
    }
    return ret;
}
