/*
 * cowtree-img snapshot: qemu-img snapshot's -l/-c/-a/-d, plus VM state save and dump.
 *   snapshot -c NAME [--vmstate FILE] IMAGE
 *   snapshot --dump-vmstate NAME OUTFILE IMAGE
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <json-c/json.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli/cli-util.h"
#include "cli/img.h"

void img_print_snapshots_human(struct ct_image *img)
{
    printf("%-10s%-17s%8s%20s%13s%11s\n", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT");
    int n = ct_snapshot_count(img);
    for (int i = 0; i < n; i++) {
        struct ct_snapshot_info s;
        ct_snapshot_get(img, (unsigned)i, &s);
        char date[32], clk[32], sz[32], ic[32] = "";
        time_t t = s.date_sec;
        struct tm tm;
        localtime_r(&t, &tm);
        strftime(date, sizeof(date), "%Y-%m-%d %H:%M:%S", &tm);
        uint64_t secs = s.vm_clock_nsec / 1000000000ull;
        snprintf(clk, sizeof(clk), "%02d:%02d:%02d.%03d", (int)(secs / 3600),
                 (int)((secs / 60) % 60), (int)(secs % 60),
                 (int)((s.vm_clock_nsec / 1000000) % 1000));
        if (s.icount != UINT64_MAX) {
            snprintf(ic, sizeof(ic), "%" PRIu64, s.icount);
        }
        printf("%-9s %-16s %8s%20s%13s%11s\n", s.id, s.name,
               cli_size_str(s.vm_state_size, sz, sizeof(sz)), date, clk, ic);
    }
}

json_object *img_snapshots_json(struct ct_image *img)
{
    json_object *arr = json_object_new_array();
    int n = ct_snapshot_count(img);
    for (int i = 0; i < n; i++) {
        struct ct_snapshot_info s;
        ct_snapshot_get(img, (unsigned)i, &s);
        json_object *o = json_object_new_object();
        if (s.icount != UINT64_MAX) {
            json_object_object_add(o, "icount", json_object_new_int64((int64_t)s.icount));
        }
        json_object_object_add(o, "vm-clock-nsec",
                               json_object_new_int64((int64_t)(s.vm_clock_nsec % 1000000000ull)));
        json_object_object_add(o, "name", json_object_new_string(s.name));
        json_object_object_add(o, "date-sec", json_object_new_int64(s.date_sec));
        json_object_object_add(o, "date-nsec", json_object_new_int64(s.date_nsec));
        json_object_object_add(o, "vm-clock-sec",
                               json_object_new_int64((int64_t)(s.vm_clock_nsec / 1000000000ull)));
        json_object_object_add(o, "id", json_object_new_string(s.id));
        json_object_object_add(o, "vm-state-size", json_object_new_int64((int64_t)s.vm_state_size));
        json_object_array_add(arr, o);
    }
    return arr;
}

static int save_vmstate(const char *path, struct ct_snapshot_create_opts *o)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        cli_error("%s: cannot open VM state file: %s", path, strerror(errno));
        return -1;
    }
    size_t cap = 1 << 20, len = 0;
    uint8_t *buf = malloc(cap);
    size_t n;
    while (buf && (n = fread(buf + len, 1, cap - len, f)) > 0) {
        len += n;
        if (len == cap) {
            uint8_t *b = realloc(buf, cap * 2);
            if (!b) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = b;
            cap *= 2;
        }
    }
    bool bad = ferror(f) || !buf;
    fclose(f);
    if (bad) {
        free(buf);
        cli_error("%s: cannot read VM state file", path);
        return -1;
    }
    o->vmstate = buf;
    o->vmstate_len = len;
    return 0;
}

static int dump_vmstate(struct ct_image *img, const char *name, const char *out)
{
    struct ct_err err = {0};
    int idx = ct_snapshot_find(img, name, &err);
    if (idx < 0) {
        cli_error_err(ct_image_filename(img), &err);
        return 1;
    }
    struct ct_snapshot_info s;
    ct_snapshot_get(img, (unsigned)idx, &s);
    FILE *f = fopen(out, "wb");
    if (!f) {
        cli_error("%s: %s", out, strerror(errno));
        return 1;
    }
    uint8_t *buf = malloc(1 << 20);
    int ret = buf ? 0 : 1;
    for (uint64_t off = 0; ret == 0 && off < s.vm_state_size;) {
        uint64_t n = s.vm_state_size - off < (1u << 20) ? s.vm_state_size - off : (1u << 20);
        if (ct_snapshot_read_vmstate(img, name, buf, n, off, &err) < 0) {
            cli_error_err(ct_image_filename(img), &err);
            ret = 1;
        } else if (fwrite(buf, 1, n, f) != n) {
            cli_error("%s: write failed: %s", out, strerror(errno));
            ret = 1;
        }
        off += n;
    }
    free(buf);
    if (fclose(f) != 0 && ret == 0) {
        cli_error("%s: %s", out, strerror(errno));
        ret = 1;
    }
    return ret;
}

int img_snapshot(int argc, char **argv)
{
    enum { NONE, LIST, CREATE, APPLY, DELETE, DUMP } action = NONE;
    const char *name = NULL, *vmstate = NULL, *output = "human", *fmt = NULL;
    bool quiet = false;
    unsigned flags = 0;
    static const struct option lo[] = {{"output", required_argument, NULL, 'O'},
                                       {"vmstate", required_argument, NULL, 'V'},
                                       {"dump-vmstate", required_argument, NULL, 'D'},
                                       {"force-share", no_argument, NULL, 'U'},
                                       {0}};
    int c;
    while ((c = getopt_long(argc, argv, "+lc:a:d:qf:U", lo, NULL)) != -1) {
        int want = NONE;
        switch (c) {
        case 'l':
            want = LIST;
            break;
        case 'c':
            want = CREATE;
            name = optarg;
            break;
        case 'a':
            want = APPLY;
            name = optarg;
            break;
        case 'd':
            want = DELETE;
            name = optarg;
            break;
        case 'D':
            want = DUMP;
            name = optarg;
            break;
        case 'V':
            vmstate = optarg;
            break;
        case 'O':
            output = optarg;
            break;
        case 'q':
            quiet = true;
            break;
        case 'f':
            fmt = optarg;
            break;
        case 'U':
            flags |= CT_OPEN_FORCE_SHARE;
            break;
        default:
            cli_error("usage: snapshot [-l | -c NAME [--vmstate FILE] | -a NAME | -d NAME | "
                      "--dump-vmstate NAME OUTFILE] [-U] FILE");
            return 1;
        }
        if (want != NONE) {
            if (action != NONE) {
                cli_error("Cannot mix snapshot actions (-l, -c, -a, -d, --dump-vmstate)");
                return 1;
            }
            action = want;
        }
    }
    if (action == NONE) {
        action = LIST;
    }
    const char *outfile = NULL;
    if (action == DUMP && argc - optind == 2) {
        outfile = argv[optind++];
    }
    if (optind != argc - 1 || (action == DUMP && !outfile)) {
        cli_error("Expecting one image file name%s", action == DUMP ? " after OUTFILE" : "");
        return 1;
    }
    if (vmstate && action != CREATE) {
        cli_error("--vmstate goes with -c");
        return 1;
    }
    bool json = strcmp(output, "json") == 0;
    if (!json && strcmp(output, "human") != 0) {
        cli_error("--output must be used with human or json as argument.");
        return 1;
    }
    const char *file = argv[optind];
    bool write = action == CREATE || action == APPLY || action == DELETE;
    struct ct_image *img =
        img_open(file, fmt, (write ? CT_OPEN_WRITE : flags) | CT_OPEN_NO_BACKING);
    if (!img) {
        return 1;
    }
    struct ct_err err = {0};
    int ret = 0, r = 0;
    switch (action) {
    case LIST:
        if (json) {
            json_object *a = img_snapshots_json(img);
            printf("%s\n", json_object_to_json_string_ext(a, JSON_C_TO_STRING_PRETTY |
                                                                 JSON_C_TO_STRING_SPACED));
            json_object_put(a);
        } else if (ct_snapshot_count(img) > 0) {
            printf("Snapshot list:\n");
            img_print_snapshots_human(img);
        }
        break;
    case CREATE: {
        struct ct_snapshot_create_opts o = {0};
        if (vmstate && save_vmstate(vmstate, &o) < 0) {
            ret = 1;
            break;
        }
        r = ct_snapshot_create(img, name, &o, &err);
        free((void *)o.vmstate);
        break;
    }
    case APPLY:
        r = ct_snapshot_apply(img, name, &err);
        break;
    case DELETE:
        r = ct_snapshot_delete(img, name, &err);
        break;
    case DUMP:
        ret = dump_vmstate(img, name, outfile);
        break;
    case NONE:
        break;
    }
    if (r < 0) {
        const char *what = action == CREATE ? "create" : action == APPLY ? "apply" : "delete";
        fprintf(stderr, "%s: %s: Could not %s snapshot '%s': %s\n", cli_prog, file, what, name,
                err.msg);
        ret = 1;
    }
    (void)quiet;
    if (ct_image_close(img, &err) < 0) {
        cli_error_err(file, &err);
        ret = 1;
    }
    return ret;
}
