/* cowtree-img check: qemu-img check's output and exit codes (0 clean, 1 check failed,
 * 2 corruptions, 3 leaks only). */
#include <getopt.h>
#include <inttypes.h>
#include <json-c/json.h>
#include <stdio.h>
#include <string.h>

#include "cli/cli-util.h"
#include "cli/img.h"

static void report_line(void *opaque, const char *line)
{
    if (opaque) {
        fprintf(stderr, "%s\n", line);
    }
}

int img_check(int argc, char **argv)
{
    const char *fmt = NULL, *output = "human";
    unsigned fix = CT_FIX_NONE;
    bool quiet = false;
    unsigned flags = 0;
    static const struct option lo[] = {{"output", required_argument, NULL, 'O'},
                                       {"repair", required_argument, NULL, 'r'},
                                       {"force-share", no_argument, NULL, 'U'},
                                       {0}};
    int c;
    while ((c = getopt_long(argc, argv, "+f:r:qU", lo, NULL)) != -1) {
        switch (c) {
        case 'f':
            fmt = optarg;
            break;
        case 'O':
            output = optarg;
            break;
        case 'q':
            quiet = true;
            break;
        case 'U':
            flags |= CT_OPEN_FORCE_SHARE;
            break;
        case 'r':
            if (!strcmp(optarg, "leaks")) {
                fix = CT_FIX_LEAKS;
            } else if (!strcmp(optarg, "all")) {
                fix = CT_FIX_ALL;
            } else {
                cli_error("Unknown option value for -r (expecting 'leaks' or 'all'): %s", optarg);
                return 1;
            }
            break;
        default:
            cli_error("usage: check [-f FMT] [-r leaks|all] [--output=human|json] [-U] FILE");
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
    if (fix) {
        flags = (flags & ~(unsigned)CT_OPEN_FORCE_SHARE) | CT_OPEN_WRITE | CT_OPEN_NO_REPAIR |
                CT_OPEN_ALLOW_CORRUPT;
    }
    /* The chain is opened as qemu-img does: a missing backing file is an error. */
    struct ct_image *img = img_open(file, fmt, flags);
    if (!img) {
        return 1;
    }
    if (strcmp(ct_image_format(img), "qcow2") != 0) {
        cli_error("This image format does not support checks");
        ct_image_close(img, NULL);
        return 63;
    }
    struct ct_check_result res;
    struct ct_err err = {0};
    int r = ct_image_check(img, fix, &res, report_line, (void *)(quiet || json ? NULL : "y"), &err);
    if (r < 0) {
        cli_error_err(file, &err);
        ct_image_close(img, NULL);
        return 1;
    }
    if (ct_image_close(img, &err) < 0) {
        cli_error_err(file, &err);
        return 1;
    }
    uint64_t left_corr = res.corruptions - res.corruptions_fixed;
    uint64_t left_leaks = res.leaks - res.leaks_fixed;
    if (json) {
        json_object *o = json_object_new_object();
        json_object_object_add(o, "image-end-offset",
                               json_object_new_int64((int64_t)res.image_end_offset));
        json_object_object_add(o, "total-clusters",
                               json_object_new_int64((int64_t)res.total_clusters));
        json_object_object_add(o, "check-errors", json_object_new_int64((int64_t)res.check_errors));
        json_object_object_add(o, "allocated-clusters",
                               json_object_new_int64((int64_t)res.allocated_clusters));
        json_object_object_add(o, "filename", json_object_new_string(file));
        json_object_object_add(o, "format", json_object_new_string("qcow2"));
        json_object_object_add(o, "fragmented-clusters",
                               json_object_new_int64((int64_t)res.fragmented_clusters));
        json_object_object_add(o, "compressed-clusters",
                               json_object_new_int64((int64_t)res.compressed_clusters));
        if (left_leaks || res.leaks_fixed) {
            json_object_object_add(o, "leaks", json_object_new_int64((int64_t)left_leaks));
        }
        if (left_corr || res.corruptions_fixed) {
            json_object_object_add(o, "corruptions", json_object_new_int64((int64_t)left_corr));
        }
        if (res.leaks_fixed) {
            json_object_object_add(o, "leaks-fixed",
                                   json_object_new_int64((int64_t)res.leaks_fixed));
        }
        if (res.corruptions_fixed) {
            json_object_object_add(o, "corruptions-fixed",
                                   json_object_new_int64((int64_t)res.corruptions_fixed));
        }
        printf("%s\n",
               json_object_to_json_string_ext(o, JSON_C_TO_STRING_PRETTY | JSON_C_TO_STRING_SPACED |
                                                     JSON_C_TO_STRING_NOSLASHESCAPE));
        json_object_put(o);
    } else if (!quiet) {
        if (res.leaks_fixed || res.corruptions_fixed) {
            printf("The following inconsistencies were found and repaired:\n\n"
                   "    %" PRIu64 " leaked clusters\n    %" PRIu64 " corruptions\n\n"
                   "Double checking the fixed image now...\n",
                   res.leaks_fixed, res.corruptions_fixed);
        }
        if (!left_corr && !left_leaks && !res.check_errors) {
            printf("No errors were found on the image.\n");
        } else {
            if (left_corr) {
                printf("\n%" PRIu64 " errors were found on the image.\n"
                       "Data may be corrupted, or further writes to the image may corrupt it.\n",
                       left_corr);
            }
            if (left_leaks) {
                printf("\n%" PRIu64 " leaked clusters were found on the image.\n"
                       "This means waste of disk space, but no harm to data.\n",
                       left_leaks);
            }
            if (res.check_errors) {
                printf("\n%" PRIu64 " internal errors have occurred during the check.\n",
                       res.check_errors);
            }
        }
        if (res.total_clusters) {
            printf("%" PRIu64 "/%" PRIu64 " = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% "
                   "compressed clusters\n",
                   res.allocated_clusters, res.total_clusters,
                   res.allocated_clusters * 100.0 / res.total_clusters,
                   res.allocated_clusters ? res.fragmented_clusters * 100.0 / res.allocated_clusters
                                          : 0.0,
                   res.allocated_clusters ? res.compressed_clusters * 100.0 / res.allocated_clusters
                                          : 0.0);
        }
        printf("Image end offset: %" PRIu64 "\n", res.image_end_offset);
    }
    if (res.check_errors) {
        return 1;
    }
    if (left_corr) {
        return 2;
    }
    if (left_leaks) {
        return 3;
    }
    return 0;
}
