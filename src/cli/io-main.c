/*
 * cowtree-io: qemu-io's command syntax over libcowtree, so one -c script runs against both.
 * Without -c, commands are read line by line from standard input.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli/cli-util.h"

static struct ct_image *img;
static const char *img_path;
static bool corruption_reported;

/* A data-path failure caused by corruption: say once why, in the tool's error format. */
static void report_corruption(void)
{
    const char *why = ct_image_last_error(img);
    if (why && !corruption_reported) {
        fprintf(stderr, "cowtree-io: %s: %s\n", img_path, why);
        corruption_reported = true;
    }
}

static int parse_num(const char *s, uint64_t *out)
{
    if (cli_parse_size(s, out) < 0) {
        printf("non-numeric length argument -- %s\n", s);
        return -1;
    }
    return 0;
}

static int parse_pattern(const char *s, int *out)
{
    char *end;
    long v = strtol(s, &end, 0);
    if (*end || v < 0 || v > 255) {
        printf("non-numeric pattern argument -- %s\n", s);
        return -1;
    }
    *out = (int)v;
    return 0;
}

static void human_bytes(uint64_t v, char *buf, size_t len)
{
    /* qemu-io's cvtstr: whole units print without decimals. */
    static const char *const u[] = {"bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
    int i = 0;
    double d = (double)v;
    while (d >= 1024 && i < 6) {
        d /= 1024;
        i++;
    }
    if (i == 0) {
        snprintf(buf, len, "%" PRIu64 " bytes", v);
    } else if (d == (uint64_t)d) {
        snprintf(buf, len, "%.0f %s", d, u[i]);
    } else {
        snprintf(buf, len, "%.3f %s", d, u[i]);
    }
}

static void print_report(const char *op, uint64_t len, uint64_t off, double secs)
{
    char s[64];
    printf("%s %" PRIu64 "/%" PRIu64 " bytes at offset %" PRIu64 "\n", op, len, len, off);
    human_bytes(len, s, sizeof(s));
    double rate = secs > 0 ? (double)len / secs : 0;
    char r[64];
    human_bytes((uint64_t)rate, r, sizeof(r));
    printf("%s, 1 ops; %02d.%02d sec (%s/sec and %.4f ops/sec)\n", s, (int)secs,
           (int)((secs - (int)secs) * 100), r, secs > 0 ? 1.0 / secs : 0.0);
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static int check_request(uint64_t off, uint64_t len)
{
    uint64_t size = ct_image_size(img);
    if (off > size || len > size - off) {
        printf("Error: request (offset %" PRIu64 ", length %" PRIu64 ") exceeds the image size "
               "%" PRIu64 "\n",
               off, len, size);
        return -1;
    }
    return 0;
}

static void dump_hex(const uint8_t *p, uint64_t len, uint64_t off)
{
    for (uint64_t i = 0; i < len; i += 16) {
        printf("%08" PRIx64 ":  ", off + i);
        for (uint64_t j = i; j < i + 16 && j < len; j++) {
            printf("%02x ", p[j]);
        }
        printf(" ");
        for (uint64_t j = i; j < i + 16 && j < len; j++) {
            putchar(p[j] >= 0x20 && p[j] < 0x7f ? p[j] : '.');
        }
        printf("\n");
    }
}

static int do_read(int argc, char **argv)
{
    bool quiet = false, verbose = false, pflag = false;
    int pattern = 0, c;
    optind = 0;
    while ((c = getopt(argc, argv, "+P:qvbCs:l:p")) != -1) {
        switch (c) {
        case 'P':
            pflag = true;
            if (parse_pattern(optarg, &pattern) < 0) {
                return -1;
            }
            break;
        case 'q':
            quiet = true;
            break;
        case 'v':
            verbose = true;
            break;
        case 'b':
        case 'C':
        case 'p':
            break;
        default:
            printf("read: unsupported option\n");
            return -1;
        }
    }
    uint64_t off, len;
    if (argc - optind != 2 || parse_num(argv[optind], &off) < 0 ||
        parse_num(argv[optind + 1], &len) < 0) {
        printf("read: usage: read [-P PATTERN] [-q] [-v] OFF LEN\n");
        return -1;
    }
    if (check_request(off, len) < 0) {
        return -1;
    }
    uint8_t *buf = malloc(len ? len : 1);
    if (!buf) {
        printf("read failed: Cannot allocate memory\n");
        return -1;
    }
    double t0 = now();
    int r = ct_image_pread(img, buf, len, off);
    double t1 = now();
    if (r < 0) {
        printf("read failed: %s\n", ct_strerror(r));
        free(buf);
        return -1;
    }
    int ret = 0;
    if (pflag) {
        for (uint64_t i = 0; i < len; i++) {
            if (buf[i] != pattern) {
                printf("Pattern verification failed at offset %" PRIu64 ", %" PRIu64 " bytes\n",
                       off, len);
                printf("first mismatch at offset %" PRIu64 ": expected 0x%02x, found 0x%02x\n",
                       off + i, pattern, buf[i]);
                ret = -1;
                break;
            }
        }
    }
    if (verbose) {
        dump_hex(buf, len, off);
    }
    if (!quiet) {
        print_report("read", len, off, t1 - t0);
    }
    free(buf);
    return ret;
}

static int do_write(int argc, char **argv)
{
    bool quiet = false, zero = false, unmap = false, fua = false, compress = false;
    int pattern = 0xcd, c;
    optind = 0;
    while ((c = getopt(argc, argv, "+P:qzufbCnc")) != -1) {
        switch (c) {
        case 'P':
            if (parse_pattern(optarg, &pattern) < 0) {
                return -1;
            }
            break;
        case 'q':
            quiet = true;
            break;
        case 'z':
            zero = true;
            break;
        case 'u':
            unmap = true;
            break;
        case 'f':
            fua = true;
            break;
        case 'c':
            compress = true;
            break;
        case 'b':
        case 'C':
        case 'n':
            break;
        default:
            printf("write: unsupported option\n");
            return -1;
        }
    }
    uint64_t off, len;
    if (argc - optind != 2 || parse_num(argv[optind], &off) < 0 ||
        parse_num(argv[optind + 1], &len) < 0) {
        printf("write: usage: write [-P PATTERN | -z [-u]] [-q] OFF LEN\n");
        return -1;
    }
    if (check_request(off, len) < 0) {
        return -1;
    }
    unsigned flags = (fua ? CT_WRITE_FUA : 0) | (unmap ? CT_WRITE_UNMAP : 0);
    double t0 = now();
    int r;
    if (zero) {
        r = ct_image_pwrite_zeroes(img, len, off, flags);
    } else {
        uint8_t *buf = malloc(len ? len : 1);
        if (!buf) {
            printf("write failed: Cannot allocate memory\n");
            return -1;
        }
        memset(buf, pattern, len);
        uint64_t cs = ct_image_cluster_size(img);
        if (compress) {
            /* Whole clusters only, as qemu-io's write -c. */
            r = cs && off % cs == 0 && (len % cs == 0 || off + len == ct_image_size(img)) ? 0
                                                                                          : -EINVAL;
            for (uint64_t o = 0; r == 0 && o < len; o += cs) {
                r = ct_image_pwrite_compressed(img, buf + o, len - o < cs ? len - o : cs, off + o);
            }
        } else {
            r = ct_image_pwrite(img, buf, len, off, flags);
        }
        free(buf);
    }
    double t1 = now();
    if (r < 0) {
        printf("write failed: %s\n", ct_strerror(r));
        return -1;
    }
    if (!quiet) {
        print_report("wrote", len, off, t1 - t0);
    }
    return 0;
}

static int do_discard(int argc, char **argv)
{
    bool quiet = false;
    int c;
    optind = 0;
    while ((c = getopt(argc, argv, "+qC")) != -1) {
        if (c == 'q') {
            quiet = true;
        } else if (c != 'C') {
            printf("discard: unsupported option\n");
            return -1;
        }
    }
    uint64_t off, len;
    if (argc - optind != 2 || parse_num(argv[optind], &off) < 0 ||
        parse_num(argv[optind + 1], &len) < 0) {
        printf("discard: usage: discard [-q] OFF LEN\n");
        return -1;
    }
    if (check_request(off, len) < 0) {
        return -1;
    }
    double t0 = now();
    int r = ct_image_discard(img, len, off);
    if (r < 0) {
        printf("discard failed: %s\n", ct_strerror(r));
        return -1;
    }
    if (!quiet) {
        print_report("discard", len, off, now() - t0);
    }
    return 0;
}

static int do_flush(int argc, char **argv)
{
    int r = ct_image_flush(img);
    if (r < 0) {
        printf("flush failed: %s\n", ct_strerror(r));
        return -1;
    }
    return 0;
}

static int do_map(int argc, char **argv)
{
    uint64_t size = ct_image_size(img);
    for (uint64_t off = 0; off < size;) {
        /* Like qemu-io's map: the top layer only. */
        struct ct_extent e, n;
        int r = ct_image_block_status(img, off, size - off, &e);
        if (r < 0 || e.len == 0) {
            printf("map failed: %s\n", ct_strerror(r));
            return -1;
        }
        bool alloc = e.flags & CT_STATUS_ALLOCATED;
        uint64_t len = e.len;
        while (off + len < size &&
               ct_image_block_status(img, off + len, size - off - len, &n) == 0 && n.len &&
               ((n.flags & CT_STATUS_ALLOCATED) != 0) == alloc) {
            len += n.len;
        }
        char a[64], b[64];
        human_bytes(len, a, sizeof(a));
        human_bytes(off, b, sizeof(b));
        printf("%s (0x%" PRIx64 ") bytes %s allocated at offset %s (0x%" PRIx64 ")\n", a, len,
               alloc ? "    " : "not", b, off);
        off += len;
    }
    return 0;
}

static int do_alloc(int argc, char **argv)
{
    uint64_t off, len = 512;
    if (argc < 2 || argc > 3 || parse_num(argv[1], &off) < 0 ||
        (argc == 3 && parse_num(argv[2], &len) < 0)) {
        printf("alloc: usage: alloc OFF [LEN]\n");
        return -1;
    }
    if (check_request(off, len) < 0) {
        return -1;
    }
    uint64_t sum = 0;
    for (uint64_t o = off; o < off + len;) {
        struct ct_extent e;
        int r = ct_image_block_status(img, o, off + len - o, &e);
        if (r < 0 || !e.len) {
            printf("alloc failed: %s\n", ct_strerror(r));
            return -1;
        }
        if (e.flags & CT_STATUS_ALLOCATED) {
            sum += e.len;
        }
        o += e.len;
    }
    char a[64];
    human_bytes(off, a, sizeof(a));
    printf("%" PRIu64 "/%" PRIu64 " bytes allocated at offset %s\n", sum, len, a);
    return 0;
}

static int do_length(int argc, char **argv)
{
    char a[64];
    human_bytes(ct_image_size(img), a, sizeof(a));
    printf("%s\n", a);
    return 0;
}

static int do_abort(int argc, char **argv)
{
    fflush(stdout);
    signal(SIGABRT, SIG_DFL);
    abort();
}

static int do_truncate(int argc, char **argv)
{
    uint64_t size;
    if (argc != 2 || parse_num(argv[1], &size) < 0) {
        printf("truncate: usage: truncate SIZE\n");
        return -1;
    }
    struct ct_err err = {0};
    if (ct_image_truncate(img, size, true, &err) < 0) {
        printf("truncate: %s\n", err.msg);
        return -1;
    }
    return 0;
}

static const struct {
    const char *name;
    int (*fn)(int argc, char **argv);
} cmds[] = {
    {"read", do_read},         {"r", do_read},      {"write", do_write},   {"w", do_write},
    {"discard", do_discard},   {"d", do_discard},   {"flush", do_flush},   {"f", do_flush},
    {"map", do_map},           {"alloc", do_alloc}, {"length", do_length}, {"abort", do_abort},
    {"truncate", do_truncate},
};

static int run_command(char *line)
{
    char *argv[64];
    int argc = 0;
    char *save = NULL;
    for (char *t = strtok_r(line, " \t\n", &save); t && argc < 63;
         t = strtok_r(NULL, " \t\n", &save)) {
        argv[argc++] = t;
    }
    argv[argc] = NULL;
    if (argc == 0) {
        return 0;
    }
    for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++) {
        if (strcmp(argv[0], cmds[i].name) == 0) {
            int r = cmds[i].fn(argc, argv);
            fflush(stdout);
            if (r < 0) {
                report_corruption();
            }
            return r;
        }
    }
    printf("command \"%s\" not found\n", argv[0]);
    return -1;
}

static void usage(void)
{
    fprintf(stderr,
            "usage: cowtree-io [-f FMT] [-r] [-U] [-l SNAPSHOT] [-t CACHE] [-c CMD]... FILE\n");
}

int main(int argc, char **argv)
{
    cli_prog = "cowtree-io";
    cli_setup_faults();
    const char *fmt = NULL, *snapshot = NULL;
    unsigned flags = CT_OPEN_WRITE;
    /* -c commands point into argv, so this array is all there is to free. */
    static char *cmdv[4096];
    int ncmd = 0, c;
    static const struct option lo[] = {{"force-share", no_argument, NULL, 'U'},
                                       {"read-only", no_argument, NULL, 'r'},
                                       {"cmd", required_argument, NULL, 'c'},
                                       {"format", required_argument, NULL, 'f'},
                                       {"snapshot", required_argument, NULL, 'l'},
                                       {"help", no_argument, NULL, 'h'},
                                       {0}};
    while ((c = getopt_long(argc, argv, "+f:c:rUt:nhl:", lo, NULL)) != -1) {
        switch (c) {
        case 'l': /* read an internal snapshot (read-only), like qemu-nbd -l */
            snapshot = optarg;
            flags &= ~(unsigned)CT_OPEN_WRITE;
            break;
        case 'f':
            fmt = optarg;
            break;
        case 'c':
            if (ncmd == (int)(sizeof(cmdv) / sizeof(cmdv[0]))) {
                cli_error("too many -c commands");
                return 1;
            }
            cmdv[ncmd++] = optarg;
            break;
        case 'r':
            flags &= ~(unsigned)CT_OPEN_WRITE;
            break;
        case 'U':
            flags = (flags & ~(unsigned)CT_OPEN_WRITE) | CT_OPEN_FORCE_SHARE;
            break;
        case 't': {
            unsigned cf;
            if (cli_cache_flags(optarg, &cf) < 0) {
                return 1;
            }
            flags = (flags & ~(unsigned)(CT_OPEN_WRITETHROUGH | CT_OPEN_NO_FLUSH)) | cf;
            break;
        }
        case 'n':
            break;
        case 'h':
            usage();
            return 0;
        default:
            usage();
            return 1;
        }
    }
    if (optind != argc - 1) {
        usage();
        return 1;
    }
    const char *file = argv[optind];
    img_path = file;
    struct ct_err err = {0};
    struct ct_open_opts o = {
        .format = fmt, .flags = flags, .backing_dirs = cli_backing_dirs(), .snapshot = snapshot};
    if (ct_image_open(&img, file, &o, &err) < 0) {
        cli_error_err(file, &err);
        return 1;
    }
    int failed = 0;
    if (ncmd) {
        for (int i = 0; i < ncmd; i++) {
            char *line = strdup(cmdv[i]);
            if (run_command(line) < 0) {
                failed = 1;
            }
            free(line);
        }
    } else {
        char *line = NULL;
        size_t cap = 0;
        bool tty = isatty(STDIN_FILENO);
        for (;;) {
            if (tty) {
                printf("cowtree-io> ");
                fflush(stdout);
            }
            if (getline(&line, &cap, stdin) < 0) {
                break;
            }
            if (strncmp(line, "quit", 4) == 0 || strncmp(line, "q\n", 2) == 0) {
                break;
            }
            if (run_command(line) < 0) {
                failed = 1;
            }
        }
        free(line);
    }
    if (ct_image_close(img, &err) < 0) {
        if (!corruption_reported) {
            cli_error_err(NULL, &err);
        }
        failed = 1;
    }
    return failed;
}
