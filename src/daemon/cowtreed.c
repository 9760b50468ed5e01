/*
 * cowtreed: serves block nodes over NBD and takes commands over QMP.
 *
 *   cowtreed [--socket QMP_PATH] [--nbd-unix PATH] [--nbd-tcp 127.0.0.1:PORT]
 *            [--blockdev node-name=N,file=PATH[,driver=qcow2|raw][,read-only=on]]...
 *            [--export type=nbd,node-name=N[,name=NAME][,writable=on]]...
 *            [--pidfile PATH] [--foreground]
 *
 * Sockets are created with mode 0600; TCP binds loopback unless an address is given. Each
 * connection gets a thread. SIGINT/SIGTERM or QMP quit stop the daemon cleanly: images are
 * flushed and closed (clearing their dirty bits).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "cli/cli-util.h"
#include "daemon/export.h"
#include "daemon/qmp.h"

static int quit_flag;
static int wake_pipe[2] = {-1, -1};

static void on_signal(int sig)
{
    quit_flag = 1;
    if (wake_pipe[1] >= 0) {
        ssize_t w = write(wake_pipe[1], "x", 1);
        (void)w;
    }
}

static int listen_unix(const char *path)
{
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        return -errno;
    }
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof(a.sun_path)) {
        close(fd);
        return -ENAMETOOLONG;
    }
    strcpy(a.sun_path, path);
    unlink(path);
    mode_t old = umask(0177); /* the socket is created 0600 */
    int r = bind(fd, (struct sockaddr *)&a, sizeof(a));
    umask(old);
    if (r < 0 || listen(fd, 64) < 0) {
        r = -errno;
        close(fd);
        return r;
    }
    return fd;
}

static int listen_tcp(const char *spec)
{
    char host[64] = "127.0.0.1";
    int port;
    const char *colon = strrchr(spec, ':');
    if (colon) {
        size_t n = (size_t)(colon - spec);
        if (n >= sizeof(host)) {
            return -EINVAL;
        }
        memcpy(host, spec, n);
        host[n] = '\0';
        port = atoi(colon + 1);
    } else {
        port = atoi(spec);
    }
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (port <= 0 || port > 65535 || inet_pton(AF_INET, host, &a.sin_addr) != 1) {
        return -EINVAL;
    }
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        return -errno;
    }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(fd, 64) < 0) {
        int r = -errno;
        close(fd);
        return r;
    }
    return fd;
}

struct conn_arg {
    int fd;
    bool qmp;
};

static void *conn_thread(void *p)
{
    struct conn_arg *a = p;
    if (a->qmp) {
        qmp_serve(a->fd, &quit_flag);
        if (quit_flag) {
            on_signal(0);
        }
    } else {
        int one = 1;
        setsockopt(a->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        nbd_serve(a->fd, &node_exports);
    }
    close(a->fd);
    free(a);
    return NULL;
}

/* key=value,key=value → lookup */
static const char *kv_get(char *const *keys, char *const *vals, int n, const char *key)
{
    for (int i = 0; i < n; i++) {
        if (strcmp(keys[i], key) == 0) {
            return vals[i];
        }
    }
    return NULL;
}

static int kv_split(char *s, char **keys, char **vals, int max)
{
    int n = 0;
    char *save = NULL;
    for (char *t = strtok_r(s, ",", &save); t && n < max; t = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(t, '=');
        if (!eq) {
            return -1;
        }
        *eq = '\0';
        keys[n] = t;
        vals[n] = eq + 1;
        n++;
    }
    return n;
}

int main(int argc, char **argv)
{
    cli_prog = "cowtreed";
    cli_setup_faults();
    const char *qmp_path = NULL, *nbd_unix = NULL, *nbd_tcp = NULL, *pidfile = NULL;
    char *blockdevs[64], *exports_spec[64];
    int nb = 0, ne = 0, c;
    static const struct option lo[] = {{"socket", required_argument, NULL, 's'},
                                       {"nbd-unix", required_argument, NULL, 'u'},
                                       {"nbd-tcp", required_argument, NULL, 't'},
                                       {"blockdev", required_argument, NULL, 'b'},
                                       {"export", required_argument, NULL, 'e'},
                                       {"pidfile", required_argument, NULL, 'p'},
                                       {"foreground", no_argument, NULL, 'f'},
                                       {"home", required_argument, NULL, 'H'},
                                       {0}};
    while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (c) {
        case 's':
            qmp_path = optarg;
            break;
        case 'u':
            nbd_unix = optarg;
            break;
        case 't':
            nbd_tcp = optarg;
            break;
        case 'p':
            pidfile = optarg;
            break;
        case 'f':
        case 'H':
            break;
        case 'b':
            if (nb == 64) {
                cli_error("too many --blockdev options");
                return 1;
            }
            blockdevs[nb++] = optarg;
            break;
        case 'e':
            if (ne == 64) {
                cli_error("too many --export options");
                return 1;
            }
            exports_spec[ne++] = optarg;
            break;
        default:
            cli_error("usage: cowtreed [--socket QMP] [--nbd-unix PATH] [--nbd-tcp ADDR:PORT] "
                      "[--blockdev ...] [--export ...] [--pidfile PATH]");
            return 1;
        }
    }
    signal(SIGPIPE, SIG_IGN);
    for (int i = 0; i < nb; i++) {
        char *keys[16], *vals[16];
        int n = kv_split(blockdevs[i], keys, vals, 16);
        const char *name = n > 0 ? kv_get(keys, vals, n, "node-name") : NULL;
        const char *file = n > 0 ? kv_get(keys, vals, n, "file") : NULL;
        const char *drv = n > 0 ? kv_get(keys, vals, n, "driver") : NULL;
        const char *ro = n > 0 ? kv_get(keys, vals, n, "read-only") : NULL;
        if (!name || !file) {
            cli_error("--blockdev needs node-name=NAME,file=PATH");
            return 1;
        }
        struct ct_err err = {0};
        if (node_add(name, file, drv, !(ro && !strcmp(ro, "on")), &err) < 0) {
            cli_error_err(file, &err);
            node_close_all();
            return 1;
        }
    }
    for (int i = 0; i < ne; i++) {
        char *keys[16], *vals[16];
        int n = kv_split(exports_spec[i], keys, vals, 16);
        const char *node = n > 0 ? kv_get(keys, vals, n, "node-name") : NULL;
        const char *name = n > 0 ? kv_get(keys, vals, n, "name") : NULL;
        const char *w = n > 0 ? kv_get(keys, vals, n, "writable") : NULL;
        struct node *nd = node ? node_find(node) : NULL;
        struct ct_err err = {0};
        if (!nd) {
            cli_error("--export: unknown node-name '%s'", node ? node : "");
            node_close_all();
            return 1;
        }
        if (node_export(nd, name ? name : node, w && !strcmp(w, "on"), &err) < 0) {
            cli_error_err(NULL, &err);
            node_close_all();
            return 1;
        }
    }
    int fds[3] = {-1, -1, -1};
    bool is_qmp[3] = {true, false, false};
    if (qmp_path && (fds[0] = listen_unix(qmp_path)) < 0) {
        cli_error("%s: cannot listen: %s", qmp_path, strerror(-fds[0]));
        return 1;
    }
    if (nbd_unix && (fds[1] = listen_unix(nbd_unix)) < 0) {
        cli_error("%s: cannot listen: %s", nbd_unix, strerror(-fds[1]));
        return 1;
    }
    if (nbd_tcp && (fds[2] = listen_tcp(nbd_tcp)) < 0) {
        cli_error("%s: cannot listen: %s", nbd_tcp, strerror(-fds[2]));
        return 1;
    }
    if (pipe2(wake_pipe, O_CLOEXEC) < 0) {
        cli_error("pipe: %s", strerror(errno));
        return 1;
    }
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    if (pidfile) {
        /* Written once every socket listens, so waiting for it is a readiness signal. */
        char tmp[4096];
        snprintf(tmp, sizeof(tmp), "%s.tmp", pidfile);
        FILE *f = fopen(tmp, "w");
        if (!f || fprintf(f, "%d\n", (int)getpid()) < 0 || fclose(f) != 0 ||
            rename(tmp, pidfile) < 0) {
            cli_error("%s: cannot write the pid file", pidfile);
            return 1;
        }
    }
    while (!quit_flag) {
        struct pollfd p[4];
        int np = 0, map[4];
        for (int i = 0; i < 3; i++) {
            if (fds[i] >= 0) {
                p[np].fd = fds[i];
                p[np].events = POLLIN;
                map[np++] = i;
            }
        }
        p[np].fd = wake_pipe[0];
        p[np].events = POLLIN;
        map[np++] = -1;
        if (poll(p, (nfds_t)np, -1) < 0) {
            if (errno == EINTR) {
                continue;
            }
            break;
        }
        for (int i = 0; i < np; i++) {
            if (!(p[i].revents & POLLIN) || map[i] < 0) {
                continue;
            }
            int cfd = accept4(p[i].fd, NULL, NULL, SOCK_CLOEXEC);
            if (cfd < 0) {
                continue;
            }
            struct conn_arg *a = malloc(sizeof(*a));
            pthread_t th;
            pthread_attr_t attr;
            pthread_attr_init(&attr);
            pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
            if (!a) {
                close(cfd);
                continue;
            }
            a->fd = cfd;
            a->qmp = is_qmp[map[i]];
            if (pthread_create(&th, &attr, conn_thread, a) != 0) {
                close(cfd);
                free(a);
            }
            pthread_attr_destroy(&attr);
        }
    }
    for (int i = 0; i < 3; i++) {
        if (fds[i] >= 0) {
            close(fds[i]);
        }
    }
    if (qmp_path) {
        unlink(qmp_path);
    }
    if (nbd_unix) {
        unlink(nbd_unix);
    }
    node_close_all();
    if (pidfile) {
        unlink(pidfile);
    }
    return 0;
}
