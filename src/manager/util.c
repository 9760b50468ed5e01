/*
 * Small helpers of the snapshot manager: allocation, string building, paths, UUIDs, names.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include "io/io.h"
#include "manager/manager-int.h"
#include "util/err.h"

void *mgr_xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p) {
        abort();
    }
    return p;
}

void *mgr_xcalloc(size_t n, size_t sz)
{
    void *p = calloc(n ? n : 1, sz ? sz : 1);
    if (!p) {
        abort();
    }
    return p;
}

void *mgr_xrealloc(void *p, size_t n)
{
    p = realloc(p, n ? n : 1);
    if (!p) {
        abort();
    }
    return p;
}

char *mgr_xstrdup(const char *s)
{
    if (!s) {
        return NULL;
    }
    char *d = strdup(s);
    if (!d) {
        abort();
    }
    return d;
}

char *mgr_xasprintf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *s = NULL;
    int r = vasprintf(&s, fmt, ap);
    va_end(ap);
    if (r < 0) {
        abort();
    }
    return s;
}

void mgr_setstr(char **slot, const char *s)
{
    char *n = mgr_xstrdup(s);
    free(*slot);
    *slot = n;
}

bool mgr_streq(const char *a, const char *b)
{
    if (!a || !b) {
        return a == b;
    }
    return strcmp(a, b) == 0;
}

static void sb_grow(struct sbuf *b, size_t add)
{
    if (b->len + add + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + add + 1) {
            cap *= 2;
        }
        b->s = mgr_xrealloc(b->s, cap);
        b->cap = cap;
    }
}

void sb_addf(struct sbuf *b, const char *fmt, ...)
{
    if (!fmt) {
        return; /* never; tells gcc's sanitizer builds the format is not NULL */
    }
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0) {
        abort();
    }
    sb_grow(b, (size_t)n);
    va_start(ap, fmt);
    vsnprintf(b->s + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

void sb_adds(struct sbuf *b, const char *s)
{
    size_t n = strlen(s);
    sb_grow(b, n);
    memcpy(b->s + b->len, s, n + 1);
    b->len += n;
}

void sb_add_xml(struct sbuf *b, const char *s)
{
    for (; s && *s; s++) {
        switch (*s) {
        case '&':
            sb_adds(b, "&amp;");
            break;
        case '<':
            sb_adds(b, "&lt;");
            break;
        case '>':
            sb_adds(b, "&gt;");
            break;
        case '\'':
            sb_adds(b, "&apos;");
            break;
        case '"':
            sb_adds(b, "&quot;");
            break;
        default: {
            char c[2] = {*s, 0};
            sb_adds(b, c);
        }
        }
    }
}

char *sb_steal(struct sbuf *b)
{
    char *s = b->s ? b->s : mgr_xstrdup("");
    b->s = NULL;
    b->len = b->cap = 0;
    return s;
}

char *mgr_abspath(const char *path)
{
    char buf[PATH_MAX];
    if (!path || !*path) {
        errno = EINVAL;
        return NULL;
    }
    if (realpath(path, buf)) {
        return mgr_xstrdup(buf);
    }
    if (errno != ENOENT) {
        return NULL;
    }
    char *copy = mgr_xstrdup(path);
    char *slash = strrchr(copy, '/');
    const char *dir = ".", *base = copy;
    if (slash) {
        *slash = '\0';
        dir = slash == copy ? "/" : copy;
        base = slash + 1;
    }
    if (!*base || strcmp(base, ".") == 0 || strcmp(base, "..") == 0) {
        free(copy);
        errno = EINVAL;
        return NULL;
    }
    if (!realpath(dir, buf)) {
        free(copy);
        return NULL;
    }
    char *r = mgr_xasprintf("%s%s%s", buf, strcmp(buf, "/") == 0 ? "" : "/", base);
    free(copy);
    return r;
}

bool mgr_file_exists(const char *path)
{
    struct stat st;
    return path && lstat(path, &st) == 0;
}

char *mgr_dirname(const char *path)
{
    const char *slash = strrchr(path, '/');
    if (!slash) {
        return mgr_xstrdup(".");
    }
    if (slash == path) {
        return mgr_xstrdup("/");
    }
    char *d = mgr_xmalloc((size_t)(slash - path) + 1);
    memcpy(d, path, (size_t)(slash - path));
    d[slash - path] = '\0';
    return d;
}

char *mgr_stem(const char *path)
{
    const char *slash = strrchr(path, '/');
    const char *base = slash ? slash + 1 : path;
    const char *dot = strrchr(base, '.');
    size_t n = dot && dot != base ? (size_t)(dot - base) : strlen(base);
    char *s = mgr_xmalloc(n + 1);
    memcpy(s, base, n);
    s[n] = '\0';
    return s;
}

/* The I/O seam (src/io) has no directory sync or unlink; these two stay here but pass its
 * fault hook, so COWTREE_FAULT=flush:K:... reaches a directory sync as it reaches a file's. */
int mgr_sync_dir(const char *path)
{
    int r = ct_fault_check(CT_FAULT_FLUSH);
    if (r < 0) {
        return r;
    }
    char *dir = mgr_dirname(path);
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    free(dir);
    if (fd < 0) {
        return -errno;
    }
    r = fsync(fd) < 0 ? -errno : 0;
    close(fd);
    return r;
}

int mgr_unlink(const char *path, struct ct_err *err)
{
    if (unlink(path) < 0 && errno != ENOENT) {
        int e = errno;
        return ct_err_set(err, -e, "cannot remove '%s': %s", path, strerror(e));
    }
    /* The removal is a journal step: it is done only once durable. */
    int r = mgr_sync_dir(path);
    if (r < 0) {
        return ct_err_set(err, r, "cannot make the removal of '%s' durable: %s", path,
                          strerror(-r));
    }
    return 0;
}

int mgr_uuid_generate(char out[37])
{
    uint8_t b[16];
    size_t got = 0;
    while (got < sizeof(b)) {
        ssize_t r = getrandom(b + got, sizeof(b) - got, 0);
        if (r < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -errno;
        }
        got += (size_t)r;
    }
    b[6] = (uint8_t)((b[6] & 0x0f) | 0x40);
    b[8] = (uint8_t)((b[8] & 0x3f) | 0x80);
    snprintf(out, 37, "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0],
             b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13],
             b[14], b[15]);
    return 0;
}

bool mgr_uuid_valid(const char *s)
{
    static const char pat[] = "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx";
    if (!s || strlen(s) != sizeof(pat) - 1) {
        return false;
    }
    for (size_t i = 0; pat[i]; i++) {
        if (pat[i] == '-' ? s[i] != '-' : !strchr("0123456789abcdefABCDEF", s[i])) {
            return false;
        }
    }
    return true;
}

int mgr_check_name(const char *what, const char *name, struct ct_err *err)
{
    if (!name || !*name) {
        return ct_err_set(err, -EINVAL, "%s name must not be empty", what);
    }
    if (strchr(name, '/')) {
        return ct_err_set(err, -EINVAL, "invalid %s name '%s': it must not contain '/'", what,
                          name);
    }
    if (name[0] == '.') {
        return ct_err_set(err, -EINVAL, "invalid %s name '%s': it must not start with '.'", what,
                          name);
    }
    for (const char *p = name; *p; p++) {
        if ((unsigned char)*p < 0x20 || *p == 0x7f) {
            return ct_err_set(err, -EINVAL, "invalid %s name: it contains control characters",
                              what);
        }
    }
    if (strlen(name) > 200) {
        return ct_err_set(err, -EINVAL, "%s name is longer than 200 bytes", what);
    }
    return 0;
}
