/*
 * QMP client (see qmp-client.h). One connection, used by one thread.
 *
 * Reading. The peer sends JSON objects separated by CRLF; a json_tokener is fed from a byte
 * buffer and every complete object is either the reply awaited (matched by "id"), an event
 * (queued in arrival order), or ignored (a reply to an id we no longer wait for). Waiting is
 * poll() with a deadline, so neither a reply nor an event wait can hang past its timeout.
 *
 * Ids are "ct-N", increasing per connection; a reply with another id is dropped.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "manager/manager-int.h"
#include "manager/qmp-client.h"
#include "util/err.h"

struct qmp {
    int fd;
    int timeout_ms;
    unsigned next_id;
    json_tokener *tok;
    char buf[65536];
    size_t blen, bpos;
    json_object **events; /* queued events, oldest first */
    size_t nev;
    char last_class[64];
};

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

const char *qmp_str(json_object *o, const char *key)
{
    json_object *v;
    if (!o || !json_object_object_get_ex(o, key, &v) ||
        json_object_get_type(v) != json_type_string) {
        return NULL;
    }
    return json_object_get_string(v);
}

int64_t qmp_int(json_object *o, const char *key, int64_t def)
{
    json_object *v;
    if (!o || !json_object_object_get_ex(o, key, &v)) {
        return def;
    }
    return json_object_get_int64(v);
}

bool qmp_bool(json_object *o, const char *key, bool def)
{
    json_object *v;
    if (!o || !json_object_object_get_ex(o, key, &v)) {
        return def;
    }
    return json_object_get_boolean(v);
}

/* Next complete JSON object from the connection; deadline < 0: none. */
static int read_object(struct qmp *q, int64_t deadline, json_object **out, struct ct_err *err)
{
    for (;;) {
        while (q->bpos < q->blen) {
            json_object *o =
                json_tokener_parse_ex(q->tok, q->buf + q->bpos, (int)(q->blen - q->bpos));
            enum json_tokener_error je = json_tokener_get_error(q->tok);
            if (je == json_tokener_continue) {
                q->bpos = q->blen;
                break;
            }
            q->bpos += json_tokener_get_parse_end(q->tok);
            if (!o) {
                json_tokener_reset(q->tok);
                /* Whitespace between messages ends up here; skip one byte of it. */
                if (je != json_tokener_success && q->bpos < q->blen) {
                    char ch = q->buf[q->bpos];
                    if (ch == '\r' || ch == '\n' || ch == ' ' || ch == '\t') {
                        q->bpos++;
                        continue;
                    }
                    return ct_err_set(err, -EPROTO, "QMP: malformed message: %s",
                                      json_tokener_error_desc(je));
                }
                continue;
            }
            json_tokener_reset(q->tok);
            if (json_object_get_type(o) != json_type_object) {
                json_object_put(o);
                continue;
            }
            *out = o;
            return 0;
        }
        q->blen = q->bpos = 0;
        int wait = -1;
        if (deadline >= 0) {
            int64_t left = deadline - now_ms();
            if (left <= 0) {
                return ct_err_set(err, -ETIMEDOUT, "QMP: no answer from the daemon in time");
            }
            wait = left > 1000000 ? 1000000 : (int)left;
        }
        struct pollfd p = {.fd = q->fd, .events = POLLIN};
        int pr = poll(&p, 1, wait);
        if (pr < 0) {
            if (errno == EINTR) {
                continue;
            }
            return ct_err_set(err, -errno, "QMP: poll: %s", strerror(errno));
        }
        if (pr == 0) {
            continue; /* the deadline check above decides */
        }
        ssize_t n = read(q->fd, q->buf, sizeof(q->buf));
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN) {
                continue;
            }
            if (errno == ECONNRESET) {
                return ct_err_set(err, -EPIPE, "QMP: the daemon closed the connection");
            }
            return ct_err_set(err, -errno, "QMP: read: %s", strerror(errno));
        }
        if (n == 0) {
            return ct_err_set(err, -EPIPE, "QMP: the daemon closed the connection");
        }
        q->blen = (size_t)n;
    }
}

static int send_all(struct qmp *q, const char *s, struct ct_err *err)
{
    size_t len = strlen(s), off = 0;
    while (off < len) {
        ssize_t n = send(q->fd, s + off, len - off, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            int e = errno;
            return ct_err_set(err, e == EPIPE ? -EPIPE : -e, "QMP: send: %s", strerror(e));
        }
        off += (size_t)n;
    }
    return 0;
}

static void queue_event(struct qmp *q, json_object *o)
{
    q->events = mgr_xrealloc(q->events, (q->nev + 1) * sizeof(*q->events));
    q->events[q->nev++] = o;
}

static int64_t deadline_of(int timeout_ms)
{
    return timeout_ms > 0 ? now_ms() + timeout_ms : -1;
}

int qmp_execute(struct qmp *q, const char *cmd, json_object *args, json_object **ret,
                struct ct_err *err)
{
    if (ret) {
        *ret = NULL;
    }
    q->last_class[0] = '\0';
    char id[32];
    snprintf(id, sizeof(id), "ct-%u", q->next_id++);
    json_object *msg = json_object_new_object();
    json_object_object_add(msg, "execute", json_object_new_string(cmd));
    if (args) {
        json_object_object_add(msg, "arguments", args);
    }
    json_object_object_add(msg, "id", json_object_new_string(id));
    char *line =
        mgr_xasprintf("%s\r\n", json_object_to_json_string_ext(
                                    msg, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE));
    json_object_put(msg);
    int r = send_all(q, line, err);
    free(line);
    if (r < 0) {
        return r;
    }
    int64_t deadline = deadline_of(q->timeout_ms);
    for (;;) {
        json_object *o = NULL;
        r = read_object(q, deadline, &o, err);
        if (r < 0) {
            ct_err_prefix(err, "%s: ", cmd);
            return r;
        }
        if (qmp_str(o, "event")) {
            queue_event(q, o);
            continue;
        }
        if (!mgr_streq(qmp_str(o, "id"), id)) {
            json_object_put(o);
            continue;
        }
        json_object *e;
        if (json_object_object_get_ex(o, "error", &e)) {
            const char *klass = qmp_str(e, "class"), *desc = qmp_str(e, "desc");
            snprintf(q->last_class, sizeof(q->last_class), "%s", klass ? klass : "GenericError");
            r = mgr_streq(klass, "CommandNotFound")  ? -ENOTSUP
                : mgr_streq(klass, "DeviceNotFound") ? -ENODEV
                                                     : -EIO;
            r = ct_err_set(err, r, "%s: %s", cmd, desc ? desc : "failed");
            json_object_put(o);
            return r;
        }
        json_object *rv;
        if (ret && json_object_object_get_ex(o, "return", &rv)) {
            *ret = json_object_get(rv);
        }
        json_object_put(o);
        return 0;
    }
}

const char *qmp_last_class(const struct qmp *q)
{
    return q->last_class;
}

static bool event_matches(json_object *ev, const char *const *names, const char *device)
{
    const char *name = qmp_str(ev, "event");
    if (names) {
        bool hit = false;
        for (size_t i = 0; names[i]; i++) {
            hit |= mgr_streq(names[i], name);
        }
        if (!hit) {
            return false;
        }
    }
    if (device) {
        json_object *data;
        if (!json_object_object_get_ex(ev, "data", &data)) {
            return false;
        }
        return mgr_streq(qmp_str(data, "device"), device) || mgr_streq(qmp_str(data, "id"), device);
    }
    return true;
}

int qmp_wait_event(struct qmp *q, const char *const *names, const char *device, int timeout_ms,
                   json_object **ev, struct ct_err *err)
{
    *ev = NULL;
    for (size_t i = 0; i < q->nev; i++) {
        if (event_matches(q->events[i], names, device)) {
            *ev = q->events[i];
            memmove(&q->events[i], &q->events[i + 1], (q->nev - i - 1) * sizeof(*q->events));
            q->nev--;
            return 0;
        }
    }
    int64_t deadline = timeout_ms >= 0 ? now_ms() + timeout_ms : -1;
    for (;;) {
        json_object *o = NULL;
        int r = read_object(q, deadline, &o, err);
        if (r < 0) {
            return r;
        }
        if (!qmp_str(o, "event")) {
            json_object_put(o); /* a late reply */
            continue;
        }
        if (event_matches(o, names, device)) {
            *ev = o;
            return 0;
        }
        queue_event(q, o);
    }
}

void qmp_drop_events(struct qmp *q)
{
    for (size_t i = 0; i < q->nev; i++) {
        json_object_put(q->events[i]);
    }
    q->nev = 0;
}

void qmp_set_timeout(struct qmp *q, int timeout_ms)
{
    q->timeout_ms = timeout_ms;
}

int qmp_connect(struct qmp **out, const char *path, int timeout_ms, struct ct_err *err)
{
    *out = NULL;
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof(a.sun_path)) {
        return ct_err_set(err, -ENAMETOOLONG, "QMP socket path too long: %s", path);
    }
    strcpy(a.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        return ct_err_set(err, -errno, "socket: %s", strerror(errno));
    }
    if (connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0) {
        int e = errno;
        close(fd);
        return ct_err_set(err, -e, "cannot connect to the daemon at %s: %s", path, strerror(e));
    }
    struct qmp *q = mgr_xcalloc(1, sizeof(*q));
    q->fd = fd;
    q->timeout_ms = timeout_ms;
    q->tok = json_tokener_new();
    if (!q->tok) {
        abort();
    }
    json_object *greet = NULL;
    int r = read_object(q, deadline_of(timeout_ms), &greet, err);
    if (r == 0 && !json_object_object_get_ex(greet, "QMP", NULL)) {
        r = ct_err_set(err, -EPROTO, "%s: not a QMP greeting", path);
    }
    json_object_put(greet);
    if (r == 0) {
        r = qmp_execute(q, "qmp_capabilities", NULL, NULL, err);
    }
    if (r < 0) {
        qmp_close(q);
        return r;
    }
    *out = q;
    return 0;
}

void qmp_close(struct qmp *q)
{
    if (!q) {
        return;
    }
    qmp_drop_events(q);
    free(q->events);
    if (q->tok) {
        json_tokener_free(q->tok);
    }
    close(q->fd);
    free(q);
}
