/*
 * cowtreed: serves block nodes over NBD and takes commands over QMP.
 *
 *   cowtreed [--socket QMP_PATH] [--nbd-unix PATH] [--nbd-tcp 127.0.0.1:PORT]
 *            [--blockdev node-name=N,file=PATH[,driver=qcow2|raw][,read-only=on]]...
 *            [--export type=nbd,node-name=N[,name=NAME][,writable=on]]...
 *            [--pidfile PATH] [--home DIR [--foreground]]
 *
 * --home DIR is the managed mode `cowtree start` uses: the QMP socket is DIR/qmp.sock, NBD
 * listens on DIR/nbd.sock, the pid file is DIR/cowtreed.pid (each unless given explicitly),
 * DIR/cowtreed.lock is held for the daemon's life so that a second daemon on the same home is
 * refused, and, unless --foreground is given, the daemon detaches once its sockets listen
 * (the command returns only then, with 0, or 1 and the error). Without --home it stays in the
 * foreground.
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
#include <sys/file.h>
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
    __atomic_store_n(&quit_flag, 1, __ATOMIC_SEQ_CST);
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
        if (__atomic_load_n(&quit_flag, __ATOMIC_SEQ_CST)) {
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

/* Take DIR/cowtreed.lock or explain who holds it. Returns the lock's fd or -1. */
static int lock_home(const char *home)
{
    char path[4096];
    if (mkdir(home, 0700) < 0 && errno != EEXIST) {
        cli_error("%s: cannot create the home directory: %s", home, strerror(errno));
        return -1;
    }
    snprintf(path, sizeof(path), "%s/cowtreed.lock", home);
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) {
        cli_error("%s: %s", path, strerror(errno));
        return -1;
    }
    if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
        int e = errno;
        char pid[32] = "?";
        snprintf(path, sizeof(path), "%s/cowtreed.pid", home);
        FILE *f = fopen(path, "r");
        if (f) {
            if (!fgets(pid, sizeof(pid), f)) {
                strcpy(pid, "?");
            }
            pid[strcspn(pid, "\n")] = '\0';
            fclose(f);
        }
        if (e == EWOULDBLOCK) {
            cli_error("another cowtreed is already running on %s (pid %s)", home, pid);
        } else {
            cli_error("%s/cowtreed.lock: %s", home, strerror(e));
        }
        close(fd);
        return -1;
    }
    return fd;
}

/* Detach: the parent waits until the child reports readiness (a byte on the pipe) or dies
 * (EOF), so `cowtreed --home DIR` returns once the daemon serves, or fails with its error. */
static int daemonize(int *ready_fd)
{
    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0) {
        cli_error("pipe: %s", strerror(errno));
        return -1;
    }
    pid_t pid = fork();
    if (pid < 0) {
        cli_error("fork: %s", strerror(errno));
        return -1;
    }
    if (pid > 0) {
        close(p[1]);
        char c;
        ssize_t n;
        do {
            n = read(p[0], &c, 1);
        } while (n < 0 && errno == EINTR);
        _exit(n == 1 ? 0 : 1);
    }
    close(p[0]);
    setsid();
    *ready_fd = p[1];
    return 0;
}

/* Readiness reached: release the waiting parent and stop writing to its terminal. */
static void daemon_ready(int ready_fd, const char *home)
{
    if (ready_fd < 0) {
        return;
    }
    char log[4096];
    snprintf(log, sizeof(log), "%s/cowtreed.log", home);
    int nul = open("/dev/null", O_RDWR | O_CLOEXEC);
    int lfd = open(log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (nul >= 0) {
        dup2(nul, STDIN_FILENO);
        dup2(nul, STDOUT_FILENO);
        close(nul);
    }
    if (lfd >= 0) {
        dup2(lfd, STDERR_FILENO);
        close(lfd);
    }
    ssize_t w = write(ready_fd, "r", 1);
    (void)w;
    close(ready_fd);
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
    const char *home = NULL;
    bool foreground = false;
    char *blockdevs[64], *exports_spec[64];
    char home_qmp[4096], home_nbd[4096], home_pid[4096];
    int nb = 0, ne = 0, c, ready_fd = -1;
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
            foreground = true;
            break;
        case 'H':
            home = optarg;
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
                      "[--blockdev ...] [--export ...] [--pidfile PATH] "
                      "[--home DIR [--foreground]]");
            return 1;
        }
    }
    if (optind < argc) {
        cli_error("unexpected argument '%s'", argv[optind]);
        return 1;
    }
    if (home) {
        if (strlen(home) > 3000) {
            cli_error("--home: path too long");
            return 1;
        }
        snprintf(home_qmp, sizeof(home_qmp), "%s/qmp.sock", home);
        snprintf(home_nbd, sizeof(home_nbd), "%s/nbd.sock", home);
        snprintf(home_pid, sizeof(home_pid), "%s/cowtreed.pid", home);
        qmp_path = qmp_path ? qmp_path : home_qmp;
        nbd_unix = nbd_unix ? nbd_unix : home_nbd;
        pidfile = pidfile ? pidfile : home_pid;
        if (!foreground && daemonize(&ready_fd) < 0) {
            return 1;
        }
        if (lock_home(home) < 0) {
            return 1; /* the lock fd stays open (and locked) for the daemon's life */
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
        char tmp[4200];
        if (snprintf(tmp, sizeof(tmp), "%s.tmp", pidfile) >= (int)sizeof(tmp)) {
            cli_error("%s: path too long", pidfile);
            return 1;
        }
        FILE *f = fopen(tmp, "w");
        if (!f || fprintf(f, "%d\n", (int)getpid()) < 0 || fclose(f) != 0 ||
            rename(tmp, pidfile) < 0) {
            cli_error("%s: cannot write the pid file", pidfile);
            return 1;
        }
    }
    daemon_ready(ready_fd, home);
    while (!__atomic_load_n(&quit_flag, __ATOMIC_SEQ_CST)) {
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
    blockjob_cancel_all();
    node_close_all();
    if (pidfile) {
        unlink(pidfile);
    }
    return 0;
}
