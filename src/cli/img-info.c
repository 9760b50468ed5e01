/* cowtree-img info: qemu-img info's human and JSON output (field names kept). */
#include <getopt.h>
#include <inttypes.h>
#include <json-c/json.h>
#include <stdio.h>
#include <string.h>

#include "cli/cli-util.h"
#include "cli/img.h"

static json_object *info_json(struct ct_image *img)
{
    struct ct_image_info in;
    ct_image_info(img, &in);
    json_object *o = json_object_new_object();
    json_object_object_add(o, "virtual-size", json_object_new_int64((int64_t)in.virtual_size));
    json_object_object_add(o, "filename", json_object_new_string(in.filename));
    if (strcmp(in.format, "qcow2") == 0) {
        json_object_object_add(o, "cluster-size", json_object_new_int64(in.cluster_size));
    }
    json_object_object_add(o, "format", json_object_new_string(in.format));
    json_object_object_add(o, "actual-size", json_object_new_int64((int64_t)in.actual_size));
    if (strcmp(in.format, "qcow2") == 0) {
        json_object *d = json_object_new_object();
        json_object_object_add(d, "compat",
                               json_object_new_string(in.version >= 3 ? "1.1" : "0.10"));
        if (in.version >= 3) {
            json_object_object_add(d, "compression-type",
                                   json_object_new_string(in.compression_type ? "zstd" : "zlib"));
            json_object_object_add(d, "lazy-refcounts", json_object_new_boolean(in.lazy_refcounts));
        }
        if (in.version < 3) {
            json_object_object_add(d, "compression-type", json_object_new_string("zlib"));
        }
        json_object_object_add(d, "refcount-bits", json_object_new_int(in.refcount_bits));
        if (in.version >= 3) {
            /* qemu-img reports these for compat=1.1 only */
            json_object_object_add(d, "corrupt", json_object_new_boolean(in.corrupt));
            json_object_object_add(d, "extended-l2", json_object_new_boolean(in.extended_l2));
        }
        json_object *fs = json_object_new_object();
        json_object_object_add(fs, "type", json_object_new_string("qcow2"));
        json_object_object_add(fs, "data", d);
        json_object_object_add(o, "format-specific", fs);
    }
    if (in.backing_file) {
        json_object_object_add(
            o, "full-backing-filename",
            json_object_new_string(in.full_backing_file ? in.full_backing_file : in.backing_file));
        json_object_object_add(o, "backing-filename", json_object_new_string(in.backing_file));
        if (in.backing_format) {
            json_object_object_add(o, "backing-filename-format",
                                   json_object_new_string(in.backing_format));
        }
    }
    if (ct_snapshot_count(img) > 0) {
        json_object_object_add(o, "snapshots", img_snapshots_json(img));
    }
    json_object_object_add(o, "dirty-flag", json_object_new_boolean(in.dirty));
    return o;
}

static void info_human(struct ct_image *img)
{
    struct ct_image_info in;
    char a[32], b[32];
    ct_image_info(img, &in);
    printf("image: %s\n", in.filename);
    printf("file format: %s\n", in.format);
    printf("virtual size: %s (%" PRIu64 " bytes)\n", cli_size_str(in.virtual_size, a, sizeof(a)),
           in.virtual_size);
    printf("disk size: %s\n", cli_size_str(in.actual_size, b, sizeof(b)));
    if (strcmp(in.format, "qcow2") == 0) {
        printf("cluster_size: %u\n", in.cluster_size);
    }
    if (in.backing_file) {
        printf("backing file: %s", in.backing_file);
        if (in.full_backing_file && strcmp(in.full_backing_file, in.backing_file) != 0) {
            printf(" (actual path: %s)", in.full_backing_file);
        }
        printf("\n");
        if (in.backing_format) {
            printf("backing file format: %s\n", in.backing_format);
        }
    }
    if (in.dirty) {
        printf("cleanly shut down: no\n");
    }
    if (ct_snapshot_count(img) > 0) {
        printf("Snapshot list:\n");
        img_print_snapshots_human(img);
    }
    if (strcmp(in.format, "qcow2") == 0) {
        printf("Format specific information:\n");
        printf("    compat: %s\n", in.version >= 3 ? "1.1" : "0.10");
        if (in.version >= 3) {
            printf("    compression type: %s\n", in.compression_type ? "zstd" : "zlib");
            printf("    lazy refcounts: %s\n", in.lazy_refcounts ? "true" : "false");
        }
        if (in.version < 3) {
            printf("    compression type: zlib\n");
        }
        printf("    refcount bits: %u\n", in.refcount_bits);
        if (in.version >= 3) {
            printf("    corrupt: %s\n", in.corrupt ? "true" : "false");
            printf("    extended l2: %s\n", in.extended_l2 ? "true" : "false");
        }
    }
}

int img_info(int argc, char **argv)
{
    const char *fmt = NULL, *output = "human";
    bool chain = false;
    unsigned flags = 0;
    static const struct option lo[] = {{"output", required_argument, NULL, 'O'},
                                       {"backing-chain", no_argument, NULL, 'B'},
                                       {"force-share", no_argument, NULL, 'U'},
                                       {0}};
    int c;
    while ((c = getopt_long(argc, argv, "+f:U", lo, NULL)) != -1) {
        switch (c) {
        case 'f':
            fmt = optarg;
            break;
        case 'O':
            output = optarg;
            break;
        case 'B':
            chain = true;
            break;
        case 'U':
            flags |= CT_OPEN_FORCE_SHARE;
            break;
        default:
            cli_error("usage: info [-f FMT] [--backing-chain] [--output=human|json] [-U] FILE");
            return 1;
        }
    }
    bool json = strcmp(output, "json") == 0;
    if (!json && strcmp(output, "human") != 0) {
        cli_error("--output must be used with human or json as argument.");
        return 1;
    }
    if (optind != argc - 1) {
        cli_error("Expecting one image file name");
        return 1;
    }
    const char *file = argv[optind];
    if (!chain) {
        flags |= CT_OPEN_NO_BACKING;
    }
    struct ct_image *img = img_open(file, fmt, flags);
    if (!img) {
        return 1;
    }
    json_object *arr = chain && json ? json_object_new_array() : NULL;
    bool first = true;
    for (struct ct_image *l = img; l; l = chain ? ct_image_backing(l) : NULL) {
        if (json) {
            json_object *o = info_json(l);
            if (arr) {
                json_object_array_add(arr, o);
            } else {
                printf("%s\n", json_object_to_json_string_ext(
                                   o, JSON_C_TO_STRING_PRETTY | JSON_C_TO_STRING_SPACED |
                                          JSON_C_TO_STRING_NOSLASHESCAPE));
                json_object_put(o);
            }
        } else {
            if (!first) {
                printf("\n");
            }
            info_human(l);
        }
        first = false;
    }
    if (arr) {
        printf("%s\n", json_object_to_json_string_ext(arr, JSON_C_TO_STRING_PRETTY |
                                                               JSON_C_TO_STRING_SPACED |
                                                               JSON_C_TO_STRING_NOSLASHESCAPE));
        json_object_put(arr);
    }
    ct_image_close(img, NULL);
    return 0;
}
