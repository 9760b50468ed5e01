/* Helpers shared by the command-line tools. */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli-util.h"

const char *cli_prog = "cowtree";

int cli_parse_size(const char *s, uint64_t *out)
{
    if (!s || !*s || *s == '-') {
        return -EINVAL;
    }
    errno = 0;
    char *end;
    double v = strtod(s, &end);
    if (errno || end == s || v < 0) {
        return -EINVAL;
    }
    unsigned shift = 0;
    switch (*end) {
    case '\0':
        break;
    case 'b':
    case 'B':
        shift = 0;
        end++;
        break;
    case 'k':
    case 'K':
        shift = 10;
        end++;
        break;
    case 'm':
    case 'M':
        shift = 20;
        end++;
        break;
    case 'g':
    case 'G':
        shift = 30;
        end++;
        break;
    case 't':
    case 'T':
        shift = 40;
        end++;
        break;
    case 'p':
    case 'P':
        shift = 50;
        end++;
        break;
    case 'e':
    case 'E':
        shift = 60;
        end++;
        break;
    default:
        return -EINVAL;
    }
    if (*end != '\0') {
        return -EINVAL;
    }
    double r = v * (double)(1ull << shift);
    if (r >= 18446744073709551615.0) {
        return -ERANGE;
    }
    if (shift == 0 && r != floor(r)) {
        return -EINVAL;
    }
    *out = (uint64_t)r;
    return 0;
}

const char *cli_size_str(uint64_t v, char *buf, size_t len)
{
    static const char *const units[] = {"", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"};
    /* Switch to the next unit once the number would reach 1000 (qemu-img prints the same). */
    int e;
    frexp((double)v / (1000.0 / 1024.0), &e);
    int i = (e - 1) / 10;
    if (i < 0) {
        i = 0;
    }
    if (i > 6) {
        i = 6;
    }
    snprintf(buf, len, "%0.3g %sB", (double)v / (double)(1ull << (i * 10)), units[i]);
    return buf;
}

int cli_cache_flags(const char *mode, unsigned *flags)
{
    static const struct {
        const char *name;
        unsigned flags;
    } modes[] = {
        {"writeback", 0},
        {"none", 0},
        {"off", 0},
        {"writethrough", CT_OPEN_WRITETHROUGH},
        {"directsync", CT_OPEN_WRITETHROUGH},
        {"unsafe", CT_OPEN_NO_FLUSH},
    };
    for (size_t i = 0; i < sizeof(modes) / sizeof(modes[0]); i++) {
        if (strcmp(mode, modes[i].name) == 0) {
            *flags = modes[i].flags;
            return 0;
        }
    }
    cli_error("Invalid cache option: %s", mode);
    return -1;
}

void cli_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "%s: ", cli_prog);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

void cli_error_err(const char *file, const struct ct_err *err)
{
    if (file) {
        fprintf(stderr, "%s: %s: %s\n", cli_prog, file, err->msg);
    } else {
        fprintf(stderr, "%s: %s\n", cli_prog, err->msg);
    }
}

static void report_counts(void)
{
    uint64_t w, f;
    ct_fault_counts(&w, &f);
    fprintf(stderr, "fault-counts: writes=%" PRIu64 " flushes=%" PRIu64 "\n", w, f);
}

void cli_setup_faults(void)
{
    const char *spec = getenv("COWTREE_FAULT");
    if (!spec || !*spec) {
        return;
    }
    if (ct_fault_configure(spec) < 0) {
        cli_error("invalid COWTREE_FAULT '%s' (want OP:K:eio|enospc|kill[,...] or count)", spec);
        exit(1);
    }
    const char *rep = getenv("COWTREE_FAULT_REPORT");
    if (rep && *rep == '1') {
        atexit(report_counts);
    }
}

const char *cli_backing_dirs(void)
{
    const char *d = getenv("COWTREE_BACKING_DIRS");
    return d && *d ? d : NULL;
}
