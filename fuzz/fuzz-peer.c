/* The fake protocol client of fuzz-nbd and fuzz-qmp; see fuzz-peer.h. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fuzz-common.h"
#include "fuzz-peer.h"

struct peer {
    int fd;
    const uint8_t *in;
    size_t in_len;
    size_t max_keep;
    struct fz_peer_out *out;
};

static void *peer_thread(void *arg)
{
    struct peer *p = arg;
    size_t sent = 0;
    bool wr_open = true;
    uint8_t buf[16384];
    if (p->in_len == 0) {
        shutdown(p->fd, SHUT_WR);
        wr_open = false;
    }
    for (;;) {
        struct pollfd pf = {.fd = p->fd, .events = POLLIN | (wr_open ? POLLOUT : 0)};
        int n = poll(&pf, 1, -1);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            fz_die("poll: %s", strerror(errno));
        }
        if (pf.revents & (POLLIN | POLLHUP | POLLERR)) {
            ssize_t r = recv(p->fd, buf, sizeof(buf), MSG_DONTWAIT);
            if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
                break; /* the server's end is closed */
            }
            if (r > 0) {
                struct fz_peer_out *o = p->out;
                size_t keep = (size_t)r;
                if (o->len + keep > p->max_keep) {
                    keep = p->max_keep - o->len;
                }
                memcpy(o->buf + o->len, buf, keep);
                o->len += keep;
                o->total += (size_t)r;
            }
        }
        if (wr_open && (pf.revents & (POLLOUT | POLLERR | POLLHUP))) {
            size_t chunk = p->in_len - sent;
            ssize_t w = send(p->fd, p->in + sent, chunk, MSG_DONTWAIT | MSG_NOSIGNAL);
            if (w > 0) {
                sent += (size_t)w;
            } else if (w < 0 && errno != EAGAIN && errno != EINTR) {
                wr_open = false; /* the server stopped reading and closed */
            }
            if (wr_open && sent == p->in_len) {
                shutdown(p->fd, SHUT_WR);
                wr_open = false;
            }
        }
    }
    p->out->written = sent;
    return NULL;
}

void fz_peer_run(const uint8_t *in, size_t in_len, void (*serve)(int fd, void *opaque),
                 void *opaque, size_t max_keep, struct fz_peer_out *out)
{
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) {
        fz_die("socketpair: %s", strerror(errno));
    }
    static uint8_t *keep_buf;
    static size_t keep_size;
    if (keep_size < max_keep || !keep_buf) {
        free(keep_buf);
        keep_size = max_keep;
        keep_buf = malloc(keep_size ? keep_size : 1);
        if (!keep_buf) {
            fz_die("out of memory");
        }
    }
    memset(out, 0, sizeof(*out));
    out->buf = keep_buf;
    struct peer p = {.fd = sv[1], .in = in, .in_len = in_len, .max_keep = max_keep, .out = out};
    pthread_t t;
    int e = pthread_create(&t, NULL, peer_thread, &p);
    if (e != 0) {
        fz_die("pthread_create: %s", strerror(e));
    }
    serve(sv[0], opaque);
    /* The server closes nothing: end its side so that the client sees EOF. */
    shutdown(sv[0], SHUT_RDWR);
    pthread_join(t, NULL);
    close(sv[0]);
    close(sv[1]);
}

static char private_dir[PATH_MAX];

static void remove_private_dir(void)
{
    if (private_dir[0] && chdir(private_dir) == 0) {
        fz_clear_dir(NULL);
        if (chdir("/") == 0) {
            rmdir(private_dir);
        }
    }
}

static char *absolute(const char *cwd, const char *path)
{
    char *s;
    if (path[0] == '/' || !path[0]) {
        s = strdup(path);
    } else if (asprintf(&s, "%s/%s", cwd, path) < 0) {
        s = NULL;
    }
    if (!s) {
        fz_die("out of memory");
    }
    return s;
}

/* Rewrite libFuzzer's arguments with absolute paths (see fuzz-peer.h). */
static void absolute_args(int *argc, char ***argv)
{
    static const char *const path_flags[] = {
        "-artifact_prefix=",    "-exact_artifact_path=", "-dict=",
        "-merge_control_file=", "-features_dir=",        "-data_flow_trace="};
    char cwd[PATH_MAX];
    if (!getcwd(cwd, sizeof(cwd))) {
        fz_die("getcwd: %s", strerror(errno));
    }
    int n = *argc;
    char **old = *argv, **nv = calloc((size_t)n + 2, sizeof(char *));
    if (!nv) {
        fz_die("out of memory");
    }
    bool has_prefix = false;
    for (int i = 0; i < n; i++) {
        const char *a = old[i];
        if (i == 0) {
            nv[i] = old[0]; /* libFuzzer refuses a changed argv[0] */
            continue;
        }
        if (a[0] != '-') {
            nv[i] = absolute(cwd, a);
            continue;
        }
        nv[i] = NULL;
        for (size_t k = 0; k < sizeof(path_flags) / sizeof(path_flags[0]); k++) {
            size_t fl = strlen(path_flags[k]);
            if (strncmp(a, path_flags[k], fl) == 0) {
                char *v = absolute(cwd, a + fl);
                if (asprintf(&nv[i], "%.*s%s", (int)fl, a, v) < 0) {
                    nv[i] = NULL;
                }
                free(v);
                has_prefix |= k == 0;
                break;
            }
        }
        if (!nv[i]) {
            nv[i] = strdup(a);
        }
    }
    if (!has_prefix && asprintf(&nv[n], "-artifact_prefix=%s/", cwd) >= 0) {
        n++;
    }
    *argc = n;
    *argv = nv; /* kept for the life of the process, as libFuzzer expects */
}

const char *fz_private_dir(const char *tag, int *argc, char ***argv)
{
    if (argc && argv) {
        absolute_args(argc, argv);
    }
    const char *bases[] = {"/dev/shm", getenv("TMPDIR"), "/tmp"};
    for (size_t i = 0; i < sizeof(bases) / sizeof(bases[0]) && !private_dir[0]; i++) {
        struct stat st;
        if (!bases[i] || stat(bases[i], &st) < 0 || !S_ISDIR(st.st_mode) ||
            access(bases[i], W_OK) < 0) {
            continue;
        }
        snprintf(private_dir, sizeof(private_dir), "%s/cowtree-%s.XXXXXX", bases[i], tag);
        if (!mkdtemp(private_dir)) {
            private_dir[0] = 0;
        }
    }
    if (!private_dir[0] || chdir(private_dir) < 0) {
        fz_die("cannot make a private directory: %s", strerror(errno));
    }
    atexit(remove_private_dir);
    return private_dir;
}

static void remove_tree(int at, const char *name)
{
    if (unlinkat(at, name, 0) == 0 || (errno != EISDIR && errno != EPERM)) {
        return;
    }
    int fd = openat(at, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    DIR *d = fd >= 0 ? fdopendir(fd) : NULL;
    if (!d) {
        if (fd >= 0) {
            close(fd);
        }
        return;
    }
    struct dirent *e;
    while ((e = readdir(d))) {
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) {
            remove_tree(dirfd(d), e->d_name);
        }
    }
    closedir(d);
    unlinkat(at, name, AT_REMOVEDIR);
}

void fz_clear_dir(const char *const *keep)
{
    DIR *d = opendir(".");
    if (!d) {
        fz_die("opendir: %s", strerror(errno));
    }
    struct dirent *e;
    while ((e = readdir(d))) {
        bool kept = !strcmp(e->d_name, ".") || !strcmp(e->d_name, "..");
        for (size_t i = 0; keep && keep[i] && !kept; i++) {
            kept = !strcmp(e->d_name, keep[i]);
        }
        if (!kept) {
            remove_tree(AT_FDCWD, e->d_name);
        }
    }
    closedir(d);
}

void fz_write_file(const char *name, const void *data, size_t len)
{
    int fd = open(name, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        fz_die("open %s: %s", name, strerror(errno));
    }
    const uint8_t *p = data;
    while (len > 0) {
        ssize_t w = write(fd, p, len);
        if (w < 0 && errno == EINTR) {
            continue;
        }
        if (w <= 0) {
            fz_die("write %s: %s", name, strerror(errno));
        }
        p += w;
        len -= (size_t)w;
    }
    close(fd);
}

uint8_t *fz_slurp(const char *name, size_t *len)
{
    int fd = open(name, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        fz_die("open %s: %s", name, strerror(errno));
    }
    uint8_t *buf;
    if (fz_read_all(fd, &buf, len, 64u << 20) < 0) {
        fz_die("%s is too large", name);
    }
    close(fd);
    return buf;
}
