/* Shared helpers for the libFuzzer targets; see fuzz-common.h. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fuzz-common.h"

bool fz_verbose;
FILE *fz_stderr;

int fz_memfd(const void *data, size_t len, char *path, size_t path_len)
{
    int fd = memfd_create("cowtree-fuzz", MFD_CLOEXEC);
    if (fd < 0) {
        fz_die("memfd_create: %s", strerror(errno));
    }
    const uint8_t *p = data;
    size_t done = 0;
    while (done < len) {
        ssize_t w = pwrite(fd, p + done, len - done, (off_t)done);
        if (w < 0) {
            if (errno == EINTR) {
                continue;
            }
            fz_die("pwrite to memfd: %s", strerror(errno));
        }
        done += (size_t)w;
    }
    snprintf(path, path_len, "/proc/self/fd/%d", fd);
    return fd;
}

int fz_read_all(int fd, uint8_t **out, size_t *len, size_t max)
{
    struct stat st;
    if (fstat(fd, &st) < 0) {
        fz_die("fstat: %s", strerror(errno));
    }
    if ((uint64_t)st.st_size > max) {
        return -1;
    }
    size_t n = (size_t)st.st_size;
    uint8_t *buf = malloc(n ? n : 1);
    if (!buf) {
        fz_die("out of memory reading %zu bytes", n);
    }
    size_t done = 0;
    while (done < n) {
        ssize_t r = pread(fd, buf + done, n - done, (off_t)done);
        if (r < 0 && errno == EINTR) {
            continue;
        }
        if (r <= 0) {
            fz_die("pread from memfd: %s", r < 0 ? strerror(errno) : "short file");
        }
        done += (size_t)r;
    }
    *out = buf;
    *len = n;
    return 0;
}

void fz_close_fd(int fd)
{
    if (fd >= 0) {
        close(fd);
    }
}

void fz_die(const char *fmt, ...)
{
    FILE *out = fz_stderr ? fz_stderr : stderr;
    va_list ap;
    va_start(ap, fmt);
    fprintf(out, "\n==== cowtree fuzz oracle violation: ");
    vfprintf(out, fmt, ap);
    fprintf(out, "\n");
    va_end(ap);
    fflush(out);
    abort();
}

void fz_report_cb(void *opaque, const char *line)
{
    struct fz_report *r = opaque;
    r->lines++;
    if (strncmp(line, "ERROR", 5) == 0) {
        r->errors++;
        const char *e = strstr(line, "entry=");
        if (strncmp(line, "ERROR OFLAG_COPIED", 18) == 0) {
            r->copied++;
        }
        if (strncmp(line, "ERROR OFLAG_COPIED", 18) == 0 && e) {
            char *end;
            unsigned long long entry = strtoull(e + 6, &end, 16);
            const char *rc = strstr(end, "refcount=");
            if (rc && strtoull(rc + 9, NULL, 10) == 1 && !(entry >> 63)) {
                r->benign++;
            }
        }
    }
    if (fz_verbose) {
        fprintf(fz_stderr ? fz_stderr : stderr, "  check: %s\n", line);
    }
    if (r->lines > 20) {
        return;
    }
    int n = snprintf(r->text + r->used, sizeof(r->text) - r->used, "    %s\n", line);
    if (n > 0) {
        r->used += (size_t)n;
        if (r->used >= sizeof(r->text)) {
            r->used = sizeof(r->text) - 1;
        }
    }
}

void fz_log(const char *fmt, ...)
{
    if (!fz_verbose) {
        return;
    }
    FILE *out = fz_stderr ? fz_stderr : stderr;
    va_list ap;
    va_start(ap, fmt);
    vfprintf(out, fmt, ap);
    va_end(ap);
    fputc('\n', out);
}

bool fz_avoid(const char *name)
{
    const char *list = getenv("FUZZ_AVOID");
    size_t n = strlen(name);
    for (const char *p = list; p && *p;) {
        const char *e = strchr(p, ',');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        if (len == n && memcmp(p, name, n) == 0) {
            return true;
        }
        p = e ? e + 1 : NULL;
    }
    return false;
}
