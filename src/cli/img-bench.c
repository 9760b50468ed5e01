/*
 * cowtree-img bench: qemu-img bench's flags and request pattern (offsets start at -o and
 * advance by -S, default the request size, wrapping at the image end), run through
 * libcowtree. -d is accepted for compatibility; the engine processes requests in order.
 */
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli/cli-util.h"
#include "cli/img.h"

int img_bench(int argc, char **argv)
{
    const char *fmt = NULL;
    uint64_t count = 75000, depth = 64, size = 4096, offset = 0, step = 0, flush_interval = 0;
    bool write = false, quiet = false, no_drain = false;
    unsigned cache_flags = 0;
    int pattern = 0xa5;
    static const struct option lo[] = {{"pattern", required_argument, NULL, 'P'},
                                       {"flush-interval", required_argument, NULL, 'I'},
                                       {"no-drain", no_argument, NULL, 'N'},
                                       {0}};
    int c;
    while ((c = getopt_long(argc, argv, "+c:d:f:no:qs:S:t:wi:U", lo, NULL)) != -1) {
        uint64_t *dst = NULL;
        switch (c) {
        case 'c':
            dst = &count;
            break;
        case 'd':
            dst = &depth;
            break;
        case 'o':
            dst = &offset;
            break;
        case 's':
            dst = &size;
            break;
        case 'S':
            dst = &step;
            break;
        case 'I':
            dst = &flush_interval;
            break;
        case 'f':
            fmt = optarg;
            break;
        case 'q':
            quiet = true;
            break;
        case 'w':
            write = true;
            break;
        case 't':
            if (cli_cache_flags(optarg, &cache_flags) < 0) {
                return 1;
            }
            break;
        case 'n':
        case 'i':
        case 'U':
            break;
        case 'N':
            no_drain = true;
            break;
        case 'P':
            pattern = (int)strtol(optarg, NULL, 0);
            break;
        default:
            cli_error("usage: bench [-c N] [-d DEPTH] [-f FMT] [-o OFF] [-s SIZE] [-S STEP] [-w] "
                      "FILE");
            return 1;
        }
        if (dst && cli_parse_size(optarg, dst) < 0) {
            cli_error("Invalid value for -%c: '%s'", c, optarg);
            return 1;
        }
    }
    (void)no_drain;
    if (optind != argc - 1) {
        cli_error("Expecting one image file name");
        return 1;
    }
    if (!step) {
        step = size;
    }
    const char *file = argv[optind];
    struct ct_image *img = img_open(file, fmt, write ? CT_OPEN_WRITE | cache_flags : 0);
    if (!img) {
        return 1;
    }
    uint64_t isize = ct_image_size(img);
    if (size == 0 || size > isize) {
        cli_error("%s: request size %" PRIu64 " does not fit the image", file, size);
        ct_image_close(img, NULL);
        return 1;
    }
    uint8_t *buf = aligned_alloc(4096, (size + 4095) & ~4095ull);
    if (!buf) {
        cli_error("out of memory");
        ct_image_close(img, NULL);
        return 1;
    }
    memset(buf, pattern, size);
    if (!quiet) {
        printf("Sending %" PRIu64 " %s requests, %" PRIu64 " bytes each, %" PRIu64
               " in parallel (starting at offset %" PRIu64 ", step size %" PRIu64 ")\n",
               count, write ? "write" : "read", size, depth, offset, step);
    }
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    uint64_t off = offset;
    int ret = 0;
    for (uint64_t i = 0; i < count; i++) {
        if (off + size > isize) {
            off = 0;
        }
        int r =
            write ? ct_image_pwrite(img, buf, size, off, 0) : ct_image_pread(img, buf, size, off);
        if (r < 0) {
            cli_error("%s: request failed at offset %" PRIu64 ": %s", file, off, ct_strerror(r));
            ret = 1;
            break;
        }
        if (write && flush_interval && (i + 1) % flush_interval == 0) {
            ct_image_flush(img);
        }
        off += step;
    }
    if (write && ret == 0) {
        ct_image_flush(img);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double secs = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
    if (!quiet && ret == 0) {
        printf("Run completed in %3.3f seconds.\n", secs);
    }
    free(buf);
    if (ct_image_close(img, NULL) < 0) {
        ret = 1;
    }
    return ret;
}
