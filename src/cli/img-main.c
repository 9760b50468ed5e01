/*
 * cowtree-img: qemu-img's verbs and flags over libcowtree. Table-driven dispatch; each verb
 * parses its own options with getopt_long, prints results on stdout and errors as
 * "cowtree-img: FILE: message" on stderr, with qemu-img's exit codes.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <json-c/json.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli-util.h"
#include "cli/img.h"
#include "cli/img-chain.h"

struct ct_image *img_open(const char *path, const char *fmt, unsigned flags)
{
    struct ct_image *img;
    struct ct_err err = {0};
    struct ct_open_opts o = {.format = fmt, .flags = flags, .backing_dirs = cli_backing_dirs()};
    if (ct_image_open(&img, path, &o, &err) < 0) {
        cli_error_err(path, &err);
        return NULL;
    }
    return img;
}

static int close_image(struct ct_image *img)
{
    struct ct_err err = {0};
    if (ct_image_close(img, &err) < 0) {
        cli_error_err(NULL, &err);
        return 1;
    }
    return 0;
}

/* -o key=value[,key=value...] for create. */
static int parse_create_opts(char *s, struct ct_create_opts *o)
{
    char *save = NULL;
    for (char *kv = strtok_r(s, ",", &save); kv; kv = strtok_r(NULL, ",", &save)) {
        char *v = strchr(kv, '=');
        if (!v) {
            cli_error("Invalid option '%s': expected key=value", kv);
            return -1;
        }
        *v++ = '\0';
        uint64_t n;
        bool on = strcmp(v, "on") == 0 || strcmp(v, "true") == 0;
        bool off = strcmp(v, "off") == 0 || strcmp(v, "false") == 0;
        if (strcmp(kv, "cluster_size") == 0) {
            if (cli_parse_size(v, &n) < 0 || n > (2u << 20)) {
                cli_error("Invalid cluster_size '%s'", v);
                return -1;
            }
            o->cluster_size = (unsigned)n;
        } else if (strcmp(kv, "compat") == 0) {
            if (!strcmp(v, "0.10") || !strcmp(v, "v2")) {
                o->compat = 2;
            } else if (!strcmp(v, "1.1") || !strcmp(v, "v3")) {
                o->compat = 3;
            } else {
                cli_error("Invalid compat '%s' (use 0.10, 1.1, v2 or v3)", v);
                return -1;
            }
        } else if (strcmp(kv, "refcount_bits") == 0) {
            if (cli_parse_size(v, &n) < 0 || n == 0 || n > 64) {
                cli_error("Invalid refcount_bits '%s'", v);
                return -1;
            }
            o->refcount_bits = (unsigned)n;
        } else if (strcmp(kv, "lazy_refcounts") == 0 || strcmp(kv, "extended_l2") == 0) {
            if (!on && !off) {
                cli_error("Invalid value '%s' for %s (use on or off)", v, kv);
                return -1;
            }
            if (kv[0] == 'l') {
                o->lazy_refcounts = on;
            } else {
                o->extended_l2 = on;
            }
        } else if (strcmp(kv, "compression_type") == 0) {
            if (!strcmp(v, "zlib")) {
                o->compression_type = 0;
            } else if (!strcmp(v, "zstd")) {
                o->compression_type = 1;
            } else {
                cli_error("Invalid compression_type '%s' (use zlib or zstd)", v);
                return -1;
            }
        } else if (strcmp(kv, "preallocation") == 0) {
            if (!strcmp(v, "off")) {
                o->prealloc = CT_PREALLOC_OFF;
            } else if (!strcmp(v, "metadata")) {
                o->prealloc = CT_PREALLOC_METADATA;
            } else if (!strcmp(v, "falloc")) {
                o->prealloc = CT_PREALLOC_FALLOC;
            } else if (!strcmp(v, "full")) {
                o->prealloc = CT_PREALLOC_FULL;
            } else {
                cli_error("Invalid preallocation '%s' (off, metadata, falloc, full)", v);
                return -1;
            }
        } else if (strcmp(kv, "backing_file") == 0) {
            o->backing_file = v;
        } else if (strcmp(kv, "backing_fmt") == 0) {
            o->backing_format = v;
        } else if (strcmp(kv, "size") == 0) {
            if (cli_parse_size(v, &o->size) < 0) {
                cli_error("Invalid size '%s'", v);
                return -1;
            }
            o->size_given = true;
        } else {
            cli_error("Invalid parameter '%s'", kv);
            return -1;
        }
    }
    return 0;
}

static int img_create(int argc, char **argv)
{
    struct ct_create_opts o = {.format = "qcow2"};
    bool quiet = false;
    int c;
    static const struct option lo[] = {{"help", no_argument, NULL, 'h'}, {0}};
    while ((c = getopt_long(argc, argv, "+qf:b:F:uo:h", lo, NULL)) != -1) {
        switch (c) {
        case 'q':
            quiet = true;
            break;
        case 'f':
            o.format = optarg;
            break;
        case 'b':
            o.backing_file = optarg;
            break;
        case 'F':
            o.backing_format = optarg;
            break;
        case 'u':
            o.no_open_backing = true;
            break;
        case 'o':
            if (parse_create_opts(optarg, &o) < 0) {
                return 1;
            }
            break;
        default:
            cli_error("usage: create [-q] -f FMT [-b BACKING -F FMT] [-u] [-o OPTS] FILE [SIZE]");
            return 1;
        }
    }
    if (optind >= argc) {
        cli_error("Expecting image file name");
        return 1;
    }
    const char *file = argv[optind++];
    if (optind < argc) {
        if (cli_parse_size(argv[optind], &o.size) < 0) {
            cli_error("Invalid image size specified. You may use k, M, G, T, P or E suffixes for "
                      "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.");
            return 1;
        }
        o.size_given = true;
        optind++;
    }
    if (optind < argc) {
        cli_error("Unexpected argument: %s", argv[optind]);
        return 1;
    }
    if (o.backing_file && !o.backing_format) {
        cli_error("%s: Backing file specified without backing format (use -F FMT)", file);
        return 1;
    }
    struct ct_err err = {0};
    if (ct_image_create(file, &o, &err) < 0) {
        cli_error_err(file, &err);
        return 1;
    }
    if (!quiet) {
        /* The size is what the image got (the backing file's when none was given). */
        uint64_t size = o.size;
        struct ct_image *img;
        struct ct_open_opts oo = {.format = o.format,
                                  .flags = CT_OPEN_NO_BACKING | CT_OPEN_FORCE_SHARE};
        if (ct_image_open(&img, file, &oo, NULL) == 0) {
            size = ct_image_size(img);
            ct_image_close(img, NULL);
        }
        printf("Formatting '%s', fmt=%s size=%" PRIu64 "%s%s%s%s\n", file, o.format, size,
               o.backing_file ? " backing_file=" : "", o.backing_file ? o.backing_file : "",
               o.backing_format ? " backing_fmt=" : "", o.backing_format ? o.backing_format : "");
    }
    return 0;
}

static int img_resize(int argc, char **argv)
{
    const char *fmt = NULL;
    bool shrink = false, quiet = false;
    static const struct option lo[] = {{"shrink", no_argument, NULL, 'S'}, {0}};
    int c;
    /* "-1G" looks like an option: only parse options before the file name. */
    while ((c = getopt_long(argc, argv, "+f:q", lo, NULL)) != -1) {
        switch (c) {
        case 'f':
            fmt = optarg;
            break;
        case 'q':
            quiet = true;
            break;
        case 'S':
            shrink = true;
            break;
        default:
            cli_error("usage: resize [--shrink] [-f FMT] FILE [+|-]SIZE");
            return 1;
        }
    }
    if (argc - optind != 2) {
        cli_error("usage: resize [--shrink] [-f FMT] FILE [+|-]SIZE");
        return 1;
    }
    const char *file = argv[optind], *arg = argv[optind + 1];
    int sign = 0;
    if (*arg == '+' || *arg == '-') {
        sign = *arg == '+' ? 1 : -1;
        arg++;
    }
    uint64_t n;
    if (cli_parse_size(arg, &n) < 0) {
        cli_error("Invalid image size specified: '%s'", argv[optind + 1]);
        return 1;
    }
    struct ct_image *img = img_open(file, fmt, CT_OPEN_WRITE);
    if (!img) {
        return 1;
    }
    uint64_t cur = ct_image_size(img), want = n;
    if (sign > 0) {
        want = cur + n;
    } else if (sign < 0) {
        if (n > cur) {
            cli_error("%s: New image size must be positive", file);
            ct_image_close(img, NULL);
            return 1;
        }
        want = cur - n;
    }
    struct ct_err err = {0};
    int r = ct_image_truncate(img, want, shrink, &err);
    if (r < 0) {
        cli_error_err(file, &err);
        ct_image_close(img, NULL);
        return 1;
    }
    if (close_image(img)) {
        return 1;
    }
    if (!quiet) {
        printf("Image resized.\n");
    }
    return 0;
}

/* ---- map ---- */

static int img_map(int argc, char **argv)
{
    const char *fmt = NULL, *output = "human";
    uint64_t start = 0, max_len = UINT64_MAX;
    static const struct option lo[] = {{"output", required_argument, NULL, 'O'},
                                       {"start-offset", required_argument, NULL, 's'},
                                       {"max-length", required_argument, NULL, 'l'},
                                       {"force-share", no_argument, NULL, 'U'},
                                       {0}};
    unsigned flags = 0;
    int c;
    while ((c = getopt_long(argc, argv, "+f:U", lo, NULL)) != -1) {
        switch (c) {
        case 'f':
            fmt = optarg;
            break;
        case 'O':
            output = optarg;
            break;
        case 'U':
            flags |= CT_OPEN_FORCE_SHARE;
            break;
        case 's':
            if (cli_parse_size(optarg, &start) < 0) {
                cli_error("Invalid start offset '%s'", optarg);
                return 1;
            }
            break;
        case 'l':
            if (cli_parse_size(optarg, &max_len) < 0) {
                cli_error("Invalid max length '%s'", optarg);
                return 1;
            }
            break;
        default:
            cli_error("usage: map [-f FMT] [--output=human|json] FILE");
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
    struct ct_image *img = img_open(file, fmt, flags);
    if (!img) {
        return 1;
    }
    uint64_t size = ct_image_size(img);
    uint64_t end = max_len > size - (start < size ? start : size) ? size : start + max_len;
    int ret = 0;
    struct ct_map_extent cur = {0};
    bool have = false;
    if (json) {
        printf("[");
    } else {
        printf("%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File");
    }
    bool first = true;
    for (uint64_t off = start; off <= end;) {
        struct ct_map_extent e = {0};
        bool last = off == end;
        if (!last) {
            int r = ct_image_map(img, off, end - off, &e);
            if (r < 0 || e.len == 0) {
                cli_error("%s: map failed at offset %" PRIu64 ": %s", file, off, ct_strerror(r));
                ret = 1;
                break;
            }
            unsigned keyf = CT_STATUS_ALLOCATED | CT_STATUS_ZERO | CT_STATUS_DATA;
            bool data =
                ((e.flags & CT_STATUS_DATA) && !(e.flags & CT_STATUS_COMPRESSED)) ||
                ((e.flags & CT_STATUS_ALLOCATED) && strcmp(ct_image_format(e.layer), "raw") == 0);
            bool cdata = ((cur.flags & CT_STATUS_DATA) && !(cur.flags & CT_STATUS_COMPRESSED)) ||
                         ((cur.flags & CT_STATUS_ALLOCATED) &&
                          strcmp(ct_image_format(cur.layer), "raw") == 0);
            if (have && (cur.flags & keyf) == (e.flags & keyf) && cur.depth == e.depth &&
                data == cdata && (!data || cur.host_off + cur.len == e.host_off) &&
                (!json || cur.layer == e.layer)) {
                cur.len += e.len;
                off += e.len;
                continue;
            }
        }
        if (have) {
            /* A raw layer's offset is meaningful even in a hole (qemu-img prints it too). */
            bool has_off = ((cur.flags & CT_STATUS_DATA) && !(cur.flags & CT_STATUS_COMPRESSED)) ||
                           ((cur.flags & CT_STATUS_ALLOCATED) &&
                            strcmp(ct_image_format(cur.layer), "raw") == 0);
            if (json) {
                printf("%s{ \"start\": %" PRIu64 ", \"length\": %" PRIu64 ", \"depth\": %u, "
                       "\"present\": %s, \"zero\": %s, \"data\": %s",
                       first ? "" : ",\n", cur.off, cur.len, cur.depth,
                       (cur.flags & CT_STATUS_ALLOCATED) ? "true" : "false",
                       (cur.flags & CT_STATUS_ZERO) ? "true" : "false",
                       (cur.flags & CT_STATUS_DATA) ? "true" : "false");
                if (has_off) {
                    printf(", \"offset\": %" PRIu64, cur.host_off);
                }
                printf("}");
                first = false;
            } else if (has_off && (cur.flags & CT_STATUS_DATA)) {
                char a[32], b[32], d[32];
                snprintf(a, sizeof(a), "%#" PRIx64, cur.off);
                snprintf(b, sizeof(b), "%#" PRIx64, cur.len);
                snprintf(d, sizeof(d), "%#" PRIx64, cur.host_off);
                printf("%-16s%-16s%-16s%s\n", cur.off ? a : "0", b, d,
                       ct_image_filename(cur.layer));
            }
        }
        if (last) {
            break;
        }
        cur = e;
        have = true;
        off += e.len;
    }
    if (json) {
        printf("]\n");
    }
    ct_image_close(img, NULL);
    return ret;
}

/* ---- compare ---- */

static bool all_zero(const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (p[i]) {
            return false;
        }
    }
    return true;
}

static int img_compare(int argc, char **argv)
{
    const char *fa = NULL, *fb = NULL;
    bool strict = false, quiet = false;
    unsigned flags = 0;
    int c;
    static const struct option lo[] = {{"force-share", no_argument, NULL, 'U'}, {0}};
    while ((c = getopt_long(argc, argv, "+f:F:sqpU", lo, NULL)) != -1) {
        switch (c) {
        case 'f':
            fa = optarg;
            break;
        case 'F':
            fb = optarg;
            break;
        case 's':
            strict = true;
            break;
        case 'q':
            quiet = true;
            break;
        case 'p':
            break;
        case 'U':
            flags |= CT_OPEN_FORCE_SHARE;
            break;
        default:
            cli_error("usage: compare [-f FMT] [-F FMT] [-s] A B");
            return 2;
        }
    }
    if (argc - optind != 2) {
        cli_error("Expecting two image file names");
        return 2;
    }
    if (fa && !fb) {
        fb = fa;
    }
    const char *pa = argv[optind], *pb = argv[optind + 1];
    struct ct_image *a = img_open(pa, fa, flags), *b = NULL;
    if (!a) {
        return 2;
    }
    b = img_open(pb, fb, flags);
    if (!b) {
        ct_image_close(a, NULL);
        return 2;
    }
    uint64_t sa = ct_image_size(a), sb = ct_image_size(b);
    int ret = 0;
    if (sa != sb) {
        if (strict) {
            if (!quiet) {
                printf("Strict mode: Image size mismatch!\n");
            }
            ret = 1;
            goto out;
        }
        if (!quiet) {
            printf("Warning: Image size mismatch!\n");
        }
    }
    const size_t chunk = 1u << 20;
    uint8_t *ba = malloc(chunk), *bb = malloc(chunk);
    if (!ba || !bb) {
        cli_error("out of memory");
        ret = 4;
        goto free_out;
    }
    uint64_t common = sa < sb ? sa : sb;
    for (uint64_t off = 0; off < common && ret == 0;) {
        size_t n = common - off < chunk ? (size_t)(common - off) : chunk;
        struct ct_map_extent ea, eb;
        /* Skip what reads as zero on both sides without reading it. */
        if (ct_image_map(a, off, n, &ea) == 0 && ct_image_map(b, off, n, &eb) == 0 &&
            (ea.flags & CT_STATUS_ZERO) && (eb.flags & CT_STATUS_ZERO) && !strict) {
            n = ea.len < eb.len ? ea.len : eb.len;
            off += n;
            continue;
        }
        int r1 = ct_image_pread(a, ba, n, off), r2 = ct_image_pread(b, bb, n, off);
        if (r1 < 0 || r2 < 0) {
            cli_error("Error while reading offset %" PRIu64 " of %s: %s", off, r1 < 0 ? pa : pb,
                      ct_strerror(r1 < 0 ? r1 : r2));
            ret = 4;
            break;
        }
        if (memcmp(ba, bb, n) != 0) {
            size_t i = 0;
            while (ba[i] == bb[i]) {
                i++;
            }
            if (!quiet) {
                printf("Content mismatch at offset %" PRIu64 "!\n",
                       (uint64_t)(off + (i & ~(size_t)511)));
            }
            ret = 1;
        }
        off += n;
    }
    /* The longer image must read as zero past the shorter one's end. */
    struct ct_image *lng = sa > sb ? a : b;
    uint64_t lsize = sa > sb ? sa : sb;
    for (uint64_t off = common; off < lsize && ret == 0;) {
        size_t n = lsize - off < chunk ? (size_t)(lsize - off) : chunk;
        int r = ct_image_pread(lng, ba, n, off);
        if (r < 0) {
            ret = 4;
            break;
        }
        if (!all_zero(ba, n)) {
            size_t i = 0;
            while (!ba[i]) {
                i++;
            }
            if (!quiet) {
                printf("Content mismatch at offset %" PRIu64 "!\n",
                       (uint64_t)(off + (i & ~(size_t)511)));
            }
            ret = 1;
        }
        off += n;
    }
    if (ret == 0 && !quiet) {
        printf("Images are identical.\n");
    }
free_out:
    free(ba);
    free(bb);
out:
    ct_image_close(a, NULL);
    ct_image_close(b, NULL);
    return ret;
}

static int img_amend(int argc, char **argv)
{
    const char *fmt = NULL;
    char *opts = NULL;
    bool quiet = false;
    int c;
    static const struct option lo[] = {{"force", no_argument, NULL, 'F'}, {0}};
    while ((c = getopt_long(argc, argv, "+f:o:pq", lo, NULL)) != -1) {
        switch (c) {
        case 'f':
            fmt = optarg;
            break;
        case 'o':
            opts = optarg;
            break;
        case 'p':
        case 'F':
            break;
        case 'q':
            quiet = true;
            break;
        default:
            cli_error("usage: amend [-f FMT] -o compat=0.10|1.1,lazy_refcounts=on|off FILE");
            return 1;
        }
    }
    (void)quiet;
    if (!opts || optind != argc - 1) {
        cli_error("usage: amend [-f FMT] -o compat=0.10|1.1,lazy_refcounts=on|off FILE");
        return 1;
    }
    int compat = 0, lazy = -1;
    char *save = NULL;
    for (char *kv = strtok_r(opts, ",", &save); kv; kv = strtok_r(NULL, ",", &save)) {
        char *v = strchr(kv, '=');
        if (!v) {
            cli_error("Invalid option '%s': expected key=value", kv);
            return 1;
        }
        *v++ = '\0';
        if (!strcmp(kv, "compat")) {
            compat = !strcmp(v, "0.10") || !strcmp(v, "v2")  ? 2
                     : !strcmp(v, "1.1") || !strcmp(v, "v3") ? 3
                                                             : -1;
        } else if (!strcmp(kv, "lazy_refcounts")) {
            lazy = !strcmp(v, "on") ? 1 : !strcmp(v, "off") ? 0 : -2;
        } else {
            cli_error("amend option '%s' is not supported (cowtree amends compat and "
                      "lazy_refcounts; use resize for size and rebase for the backing file)",
                      kv);
            return 1;
        }
        if (compat < 0 || lazy < -1) {
            cli_error("Invalid value '%s' for %s", v, kv);
            return 1;
        }
    }
    const char *file = argv[optind];
    struct ct_image *img = img_open(file, fmt, CT_OPEN_WRITE | CT_OPEN_NO_BACKING);
    if (!img) {
        return 1;
    }
    struct ct_err err = {0};
    int r = ct_image_amend(img, compat, lazy, &err);
    if (r < 0) {
        cli_error_err(file, &err);
    }
    if (close_image(img)) {
        return 1;
    }
    return r < 0 ? 1 : 0;
}

static const struct {
    const char *name;
    int (*fn)(int argc, char **argv);
    const char *help;
} commands[] = {
    {"create", img_create, "create [-q] -f FMT [-b BACKING -F FMT] [-u] [-o OPTS] FILE [SIZE]"},
    {"info", img_info, "info [-f FMT] [--backing-chain] [--output=human|json] [-U] FILE"},
    {"check", img_check, "check [-f FMT] [-r leaks|all] [--output=human|json] [-U] FILE"},
    {"map", img_map, "map [-f FMT] [--output=human|json] [-U] FILE"},
    {"compare", img_compare, "compare [-f FMT] [-F FMT] [-s] [-U] A B"},
    {"resize", img_resize, "resize [--shrink] [-f FMT] FILE [+|-]SIZE"},
    {"snapshot", img_snapshot,
     "snapshot [-l | -c NAME [--vmstate FILE] | -a NAME | -d NAME | --dump-vmstate NAME OUT] FILE"},
    {"diff", img_diff, "diff [--output=human|json] FILE FROM [TO]"},
    {"amend", img_amend, "amend [-f FMT] -o compat=0.10|1.1,lazy_refcounts=on|off FILE"},
    {"compact", img_compact, "compact [-q] FILE"},
    {"split", img_split, "split [-B BASE -F FMT] FILE SNAPSHOT NEW"},
#include "cli/img-chain-verbs.inc"
    {"bench", img_bench, "bench [-c N] [-d DEPTH] [-s SIZE] [-S STEP] [-o OFF] [-w] FILE"},
};

static void usage(FILE *out)
{
    fprintf(out, "usage: cowtree-img COMMAND [ARGS...]\n\nCommands:\n");
    for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++) {
        fprintf(out, "  %s\n", commands[i].help);
    }
}

int main(int argc, char **argv)
{
    cli_prog = "cowtree-img";
    cli_setup_faults();
    if (argc < 2) {
        usage(stderr);
        return 1;
    }
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        usage(stdout);
        return 0;
    }
    if (!strcmp(argv[1], "--version") || !strcmp(argv[1], "-V")) {
        printf("cowtree-img version %s\n", CT_VERSION_STRING);
        return 0;
    }
    for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++) {
        if (strcmp(argv[1], commands[i].name) == 0) {
            optind = 1;
            return commands[i].fn(argc - 1, argv + 1);
        }
    }
    cli_error("Command not found: %s", argv[1]);
    return 1;
}
