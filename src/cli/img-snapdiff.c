/*
 * cowtree-img diff and split: what qemu-img never offered for internal snapshots.
 *   diff [--output=human|json] FILE FROM [TO]     extents that may differ (metadata only)
 *   split [-B BASE -F FMT] [-o OPTS] FILE SNAPSHOT NEW
 *        write one snapshot as a new standalone image, or as an overlay of BASE holding
 *        only what differs from BASE; the active state of FILE is not touched.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli-util.h"
#include "cli/img.h"

struct diff_out {
    bool json, first;
    uint64_t bytes, extents;
};

static int print_extent(void *opaque, uint64_t off, uint64_t len)
{
    struct diff_out *o = opaque;
    if (o->json) {
        printf("%s{ \"start\": %" PRIu64 ", \"length\": %" PRIu64 " }", o->first ? "" : ",\n", off,
               len);
    } else {
        char a[32], b[32];
        snprintf(a, sizeof(a), "%#" PRIx64, off);
        snprintf(b, sizeof(b), "%#" PRIx64, len);
        printf("%-16s%s\n", off ? a : "0", b);
    }
    o->first = false;
    o->bytes += len;
    o->extents++;
    return 0;
}

int img_diff(int argc, char **argv)
{
    const char *output = "human";
    unsigned flags = CT_OPEN_NO_BACKING;
    static const struct option lo[] = {
        {"output", required_argument, NULL, 'O'}, {"force-share", no_argument, NULL, 'U'}, {0}};
    int c;
    while ((c = getopt_long(argc, argv, "+U", lo, NULL)) != -1) {
        switch (c) {
        case 'O':
            output = optarg;
            break;
        case 'U':
            flags |= CT_OPEN_FORCE_SHARE;
            break;
        default:
            cli_error("usage: diff [--output=human|json] FILE FROM [TO]");
            return 1;
        }
    }
    bool json = strcmp(output, "json") == 0;
    if ((!json && strcmp(output, "human") != 0) || argc - optind < 2 || argc - optind > 3) {
        cli_error("usage: diff [--output=human|json] FILE FROM [TO]");
        return 1;
    }
    const char *file = argv[optind], *from = argv[optind + 1];
    const char *to = argc - optind == 3 ? argv[optind + 2] : NULL;
    struct ct_image *img = img_open(file, NULL, flags);
    if (!img) {
        return 1;
    }
    struct diff_out o = {.json = json, .first = true};
    struct ct_err err = {0};
    if (json) {
        printf("[");
    } else {
        printf("%-16s%s\n", "Offset", "Length");
    }
    int r = ct_snapshot_diff(img, from, to, print_extent, &o, &err);
    if (json) {
        printf("]\n");
    } else if (r == 0) {
        printf("%" PRIu64 " bytes in %" PRIu64 " extents may differ between '%s' and '%s'\n",
               o.bytes, o.extents, from, to ? to : "the active state");
    }
    if (r < 0) {
        cli_error_err(file, &err);
    }
    ct_image_close(img, NULL);
    return r < 0 ? 1 : 0;
}

static bool is_zero(const uint8_t *p, size_t n)
{
    return n == 0 || (p[0] == 0 && memcmp(p, p + 1, n - 1) == 0);
}

/* Copy [off, off+len) from src to dst, skipping all-zero chunks (dst reads zero there) and,
 * when cmp is set, chunks where cmp already has the same content. */
static int copy_range(struct ct_image *src, struct ct_image *dst, struct ct_image *cmp,
                      uint64_t off, uint64_t len, uint8_t *a, uint8_t *b, uint64_t chunk)
{
    while (len > 0) {
        uint64_t n = len < chunk ? len : chunk;
        int r = ct_image_pread(src, a, n, off);
        if (r < 0) {
            return r;
        }
        bool write;
        if (cmp) {
            uint64_t csize = ct_image_size(cmp);
            uint64_t m = off < csize ? (n < csize - off ? n : csize - off) : 0;
            memset(b + m, 0, n - m);
            r = m ? ct_image_pread(cmp, b, m, off) : 0;
            if (r < 0) {
                return r;
            }
            /* Only the sub-chunks (64 KiB) that differ go into the overlay. */
            for (uint64_t o = 0; o < n; o += 65536) {
                uint64_t sub = n - o < 65536 ? n - o : 65536;
                if (memcmp(a + o, b + o, sub) == 0) {
                    continue;
                }
                r = is_zero(a + o, sub) ? ct_image_pwrite_zeroes(dst, sub, off + o, 0)
                                        : ct_image_pwrite(dst, a + o, sub, off + o, 0);
                if (r < 0) {
                    return r;
                }
            }
            write = false;
        } else {
            write = !is_zero(a, n);
        }
        if (write) {
            r = ct_image_pwrite(dst, a, n, off, 0);
            if (r < 0) {
                return r;
            }
        }
        off += n;
        len -= n;
    }
    return 0;
}

int img_split(int argc, char **argv)
{
    const char *base = NULL, *base_fmt = NULL;
    bool quiet = false;
    int c;
    while ((c = getopt(argc, argv, "+B:F:q")) != -1) {
        switch (c) {
        case 'B':
            base = optarg;
            break;
        case 'F':
            base_fmt = optarg;
            break;
        case 'q':
            quiet = true;
            break;
        default:
            cli_error("usage: split [-B BASE -F FMT] FILE SNAPSHOT NEW");
            return 1;
        }
    }
    if (argc - optind != 3) {
        cli_error("usage: split [-B BASE -F FMT] FILE SNAPSHOT NEW");
        return 1;
    }
    if (base && !base_fmt) {
        cli_error("-B needs the base's format (-F FMT)");
        return 1;
    }
    const char *file = argv[optind], *snap = argv[optind + 1], *out = argv[optind + 2];
    struct ct_err err = {0};
    struct ct_image *src = NULL, *dst = NULL;
    struct ct_open_opts so = {.snapshot = snap};
    if (ct_image_open(&src, file, &so, &err) < 0) {
        cli_error_err(file, &err);
        return 1;
    }
    struct ct_create_opts co = {.format = "qcow2",
                                .size = ct_image_size(src),
                                .size_given = true,
                                .backing_file = base,
                                .backing_format = base_fmt,
                                .cluster_size = (unsigned)ct_image_cluster_size(src)};
    if (ct_image_create(out, &co, &err) < 0) {
        cli_error_err(out, &err);
        ct_image_close(src, NULL);
        return 1;
    }
    struct ct_open_opts dopts = {.flags = CT_OPEN_WRITE, .format = "qcow2"};
    if (ct_image_open(&dst, out, &dopts, &err) < 0) {
        cli_error_err(out, &err);
        ct_image_close(src, NULL);
        return 1;
    }
    struct ct_image *cmp = ct_image_backing(dst);
    const uint64_t chunk = 1u << 20;
    uint8_t *a = malloc(chunk), *b = malloc(chunk);
    int r = a && b ? 0 : -ENOMEM;
    uint64_t size = ct_image_size(src), copied = 0;
    for (uint64_t off = 0; r == 0 && off < size;) {
        /* Visit only what the snapshot's chain or the base allocate. */
        struct ct_map_extent e;
        r = ct_image_map(src, off, size - off, &e);
        if (r < 0 || e.len == 0) {
            r = r < 0 ? r : -EIO;
            break;
        }
        uint64_t len = e.len;
        bool src_zero = (e.flags & CT_STATUS_ZERO) != 0;
        bool needed = !src_zero;
        if (cmp && !needed && off < ct_image_size(cmp)) {
            struct ct_map_extent be;
            r = ct_image_map(cmp, off, len, &be);
            if (r < 0) {
                break;
            }
            len = be.len;
            needed = !(be.flags & CT_STATUS_ZERO);
        }
        if (needed) {
            r = copy_range(src, dst, cmp, off, len, a, b, chunk);
            copied += len;
        }
        off += len;
    }
    free(a);
    free(b);
    if (r < 0) {
        cli_error("%s: split failed: %s", out, ct_strerror(r));
    }
    ct_image_close(src, NULL);
    if (ct_image_close(dst, &err) < 0 && r == 0) {
        cli_error_err(out, &err);
        r = -EIO;
    }
    if (r == 0 && !quiet) {
        printf("Snapshot '%s' of %s written to %s (%" PRIu64 " bytes examined)\n", snap, file, out,
               copied);
    }
    return r < 0 ? 1 : 0;
}

int img_compact(int argc, char **argv)
{
    bool quiet = false;
    int c;
    while ((c = getopt(argc, argv, "+q")) != -1) {
        if (c != 'q') {
            cli_error("usage: compact [-q] FILE");
            return 1;
        }
        quiet = true;
    }
    if (argc - optind != 1) {
        cli_error("usage: compact [-q] FILE");
        return 1;
    }
    const char *file = argv[optind];
    struct ct_image *img = img_open(file, "qcow2", CT_OPEN_WRITE | CT_OPEN_NO_BACKING);
    if (!img) {
        return 1;
    }
    struct ct_compact_result res;
    struct ct_err err = {0};
    int r = ct_image_compact(img, &res, &err);
    if (r < 0) {
        cli_error_err(file, &err);
    }
    if (ct_image_close(img, &err) < 0 && r == 0) {
        cli_error_err(file, &err);
        r = -EIO;
    }
    if (r == 0 && !quiet) {
        char a[32], b[32], d[32], e[32], f[32];
        printf("Moved %" PRIu64 " clusters; file size %s -> %s; disk usage %s -> %s "
               "(%s reclaimed)\n",
               res.clusters_moved, cli_size_str(res.file_size_before, a, sizeof(a)),
               cli_size_str(res.file_size_after, b, sizeof(b)),
               cli_size_str(res.allocated_before, d, sizeof(d)),
               cli_size_str(res.allocated_after, e, sizeof(e)),
               cli_size_str(res.allocated_before > res.allocated_after
                                ? res.allocated_before - res.allocated_after
                                : 0,
                            f, sizeof(f)));
    }
    return r < 0 ? 1 : 0;
}
