/*
 * cowtree-img measure: qemu-img measure.
 *
 *   measure [--output=human|json] [-O FMT] [-o OPTS] [-f FMT] [-U] (--size N | [-l SNAP] FILE)
 *
 * Prints the size a new image of format FMT (default raw) needs to hold FILE's content (or N
 * bytes), and its size when fully allocated, computed as qemu-img 7.2 does:
 *  - raw: the virtual size for both.
 *  - qcow2: fully allocated = header cluster + L2 tables for every cluster + L1 table + the
 *    refcount table and blocks covering all of that (a fixed point: refcount blocks count
 *    themselves); required = the same minus the data clusters FILE does not allocate (ranges
 *    its chain reads as zero are not needed; with a backing file in -o, every cluster is
 *    counted, since nothing is known to be shared).
 *  - "bitmaps size: 0" is shown for qcow2 v3 output from a qcow2 input (no persistent bitmaps
 *    are copied).
 */
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli-util.h"
#include "cli/img-chain.h"
#include "cli/img.h"

#define USAGE                                                                                      \
    "usage: measure [--output=human|json] [-O FMT] [-o OPTS] [-f FMT] (--size N | [-l SNAP] FILE)"

enum { OPT_SIZE = 256, OPT_OUTPUT, OPT_OBJECT, OPT_IMAGE_OPTS };

static uint64_t round_up(uint64_t v, uint64_t a)
{
    return (v + a - 1) / a * a;
}

static uint64_t div_up(uint64_t v, uint64_t d)
{
    return (v + d - 1) / d;
}

/* Refcount table and blocks needed to count `clusters` clusters plus themselves. */
static uint64_t refcount_metadata_size(uint64_t clusters, uint64_t cluster_size,
                                       unsigned refcount_bits)
{
    uint64_t per_table_cluster = cluster_size / 8;
    uint64_t per_block = cluster_size * 8 / refcount_bits;
    uint64_t table = 0, blocks = 0, n = 0, last;
    do {
        last = n;
        blocks = div_up(clusters + table + blocks, per_block);
        table = div_up(blocks, per_table_cluster);
        n = clusters + blocks + table;
    } while (n != last);
    return (blocks + table) * cluster_size;
}

static uint64_t qcow2_full_size(uint64_t size, uint64_t cluster_size, unsigned refcount_bits,
                                bool extended_l2)
{
    uint64_t l2e = extended_l2 ? 16 : 8;
    uint64_t aligned = round_up(size, cluster_size);
    uint64_t meta = cluster_size; /* header */
    uint64_t nl2e = round_up(aligned / cluster_size, cluster_size / l2e);
    meta += nl2e * l2e;
    uint64_t nl1e = round_up(nl2e * l2e / cluster_size, cluster_size / 8);
    meta += nl1e * 8;
    meta += refcount_metadata_size((meta + aligned) / cluster_size, cluster_size, refcount_bits);
    return meta + aligned;
}

/* Bytes of FILE's clusters that hold data (qemu's count: each data extent rounded out to
 * whole clusters). */
static int allocated_bytes(struct ct_image *img, uint64_t cluster_size, uint64_t *out)
{
    uint64_t size = ct_image_size(img), req = 0;
    for (uint64_t off = 0; off < size;) {
        struct ct_map_extent m;
        int r = ct_image_map(img, off, size - off, &m);
        if (r < 0 || m.len == 0) {
            return r < 0 ? r : -5;
        }
        uint64_t len = m.len;
        if (!(m.flags & CT_STATUS_ZERO) && (m.flags & (CT_STATUS_DATA | CT_STATUS_ALLOCATED)) ==
                                               (CT_STATUS_DATA | CT_STATUS_ALLOCATED)) {
            len = round_up(off + len, cluster_size) - off;
            req += off % cluster_size + len;
        }
        off += len;
    }
    *out = req;
    return 0;
}

int img_measure(int argc, char **argv)
{
    const char *fmt = NULL, *out_fmt = "raw", *output = "human", *snap = NULL;
    char *optstr = NULL;
    uint64_t size = 0;
    bool have_size = false;
    unsigned flags = 0;
    static const struct option lo[] = {
        {"help", no_argument, NULL, 'h'},
        {"size", required_argument, NULL, OPT_SIZE},
        {"output", required_argument, NULL, OPT_OUTPUT},
        {"force-share", no_argument, NULL, 'U'},
        {"object", required_argument, NULL, OPT_OBJECT},
        {"image-opts", no_argument, NULL, OPT_IMAGE_OPTS},
        {0},
    };
    int c, ret = 1;
    while ((c = getopt_long(argc, argv, "+f:O:o:l:Uh", lo, NULL)) != -1) {
        switch (c) {
        case 'f':
            fmt = optarg;
            break;
        case 'O':
            out_fmt = optarg;
            break;
        case 'U':
            flags |= CT_OPEN_FORCE_SHARE;
            break;
        case OPT_OBJECT:
            break;
        case OPT_OUTPUT:
            output = optarg;
            break;
        case 'o': {
            char *n = NULL;
            if (optstr ? asprintf(&n, "%s,%s", optstr, optarg) < 0 : !(n = strdup(optarg))) {
                n = NULL;
            }
            free(optstr);
            optstr = n;
            if (!optstr) {
                cli_error("out of memory");
                goto out;
            }
            break;
        }
        case 'l':
            snap = chain_snapshot_param(optarg);
            if (!snap) {
                cli_error("Invalid snapshot parameter '%s'", optarg);
                goto out;
            }
            break;
        case OPT_SIZE:
            if (cli_parse_size(optarg, &size) < 0) {
                cli_error("Invalid size specified. Must be between 0 and 9223372036854775807.");
                goto out;
            }
            have_size = true;
            break;
        case OPT_IMAGE_OPTS:
            cli_error("--image-opts is not supported");
            goto out;
        default:
            cli_error(USAGE);
            goto out;
        }
    }
    bool json = !strcmp(output, "json");
    if (!json && strcmp(output, "human")) {
        cli_error("--output must be used with human or json as argument.");
        goto out;
    }
    const char *file = optind < argc ? argv[optind] : NULL;
    if (optind < argc - 1) {
        cli_error("Expecting one image file name");
        goto out;
    }
    if (file && have_size) {
        cli_error("--size N cannot be used together with a filename.");
        goto out;
    }
    if (!file && !have_size) {
        cli_error("Either --size N or one filename must be specified.");
        goto out;
    }
    if (snap && !file) {
        cli_error("--size N cannot be used together with -l.");
        goto out;
    }
    struct ct_create_opts co = {.format = out_fmt};
    if (optstr && chain_parse_create_opts(optstr, &co, true) < 0) {
        goto out;
    }
    bool qcow2 = !strcmp(out_fmt, "qcow2");
    if (!qcow2 && strcmp(out_fmt, "raw")) {
        cli_error("Unknown file format '%s'", out_fmt);
        goto out;
    }
    uint64_t cs = co.cluster_size ? co.cluster_size : 65536;
    int version = co.compat ? co.compat : 3;
    unsigned rb = co.refcount_bits ? co.refcount_bits : 16;
    if (qcow2 && version < 3 && rb != 16) {
        cli_error("Different refcount widths than 16 bits require compatibility level 1.1 or "
                  "above (use version=v3 or greater)");
        goto out;
    }
    if (qcow2 && co.extended_l2 && cs < 16384) {
        cli_error("Extended L2 entries are only supported with cluster sizes of at least 16384 "
                  "bytes");
        goto out;
    }

    struct ct_image *img = NULL;
    bool has_bitmaps = false;
    uint64_t virt, required = 0, full;
    if (file) {
        struct ct_err err = {0};
        struct ct_open_opts o = {.format = fmt, .flags = flags, .snapshot = snap};
        if (ct_image_open(&img, file, &o, &err) < 0) {
            cli_error_err(file, &err);
            goto out;
        }
        size = ct_image_size(img);
        has_bitmaps = qcow2 && version >= 3 && !strcmp(ct_image_format(img), "qcow2");
    }
    if (!qcow2) {
        virt = file ? size : round_up(size, 512);
        required = full = virt;
    } else {
        virt = round_up(size, cs);
        uint64_t l2_tables = div_up(virt / cs, cs / (co.extended_l2 ? 16 : 8));
        if (l2_tables * 8 > (32u << 20)) {
            cli_error("The image size is too large (try using a larger cluster size)");
            ct_image_close(img, NULL);
            goto out;
        }
        if (!file) {
            required = 0;
        } else if (co.backing_file) {
            required = virt;
        } else if (allocated_bytes(img, cs, &required) < 0) {
            cli_error("%s: Unable to get block status", file);
            ct_image_close(img, NULL);
            goto out;
        }
        if (co.prealloc == CT_PREALLOC_FULL || co.prealloc == CT_PREALLOC_FALLOC) {
            required = virt;
        }
        full = qcow2_full_size(virt, cs, rb, co.extended_l2);
        required = full - virt + required;
    }
    ct_image_close(img, NULL);
    if (json) {
        printf("{\n");
        if (has_bitmaps) {
            printf("    \"bitmaps\": 0,\n");
        }
        printf("    \"required\": %" PRIu64 ",\n    \"fully-allocated\": %" PRIu64 "\n}\n",
               required, full);
    } else {
        printf("required size: %" PRIu64 "\nfully allocated size: %" PRIu64 "\n", required, full);
        if (has_bitmaps) {
            printf("bitmaps size: 0\n");
        }
    }
    ret = 0;
out:
    free(optstr);
    return ret;
}
