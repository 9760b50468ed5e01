/*
 * NBD server: fixed newstyle negotiation (EXPORT_NAME, ABORT, LIST, INFO, GO,
 * STRUCTURED_REPLY, LIST/SET_META_CONTEXT) and transmission (READ, WRITE with FUA, FLUSH,
 * TRIM, WRITE_ZEROES, CACHE, BLOCK_STATUS for base:allocation and qemu:allocation-depth).
 *
 * States of one connection:
 *
 *   NEGOTIATING --GO/EXPORT_NAME--> TRANSMITTING --DISC/EOF--> CLOSED
 *        |                               |
 *        '--ABORT/EOF/protocol error-----'----> CLOSED
 *
 * Every length read from the wire is bounded before anything is allocated (option payloads
 * by NBD_MAX_OPTION, requests by NBD_MAX_REQUEST); a request that cannot be framed safely
 * ends the connection.
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "nbd/nbd-proto.h"
#include "nbd/nbd-server.h"
#include "util/bswap.h"

#define NBD_MAX_OPTION (64u << 10)
#define MAX_EXTENTS    2048

enum { CTX_BASE = 1, CTX_DEPTH = 2 };
static const char *const ctx_names[] = {NULL, "base:allocation", "qemu:allocation-depth"};

struct xmit;

struct conn {
    int fd;
    const struct nbd_exports *exports;
    struct nbd_export *exp;
    bool structured;
    bool no_zeroes;
    bool ctx[3];
    uint64_t size;  /* the export's size when transmission began */
    struct xmit *x; /* transmission state, shared by the connection's workers */
};

static int read_full(int fd, void *buf, size_t n)
{
    uint8_t *p = buf;
    while (n > 0) {
        ssize_t r = read(fd, p, n);
        if (r < 0 && errno == EINTR) {
            continue;
        }
        if (r <= 0) {
            return r == 0 ? -ECONNRESET : -errno;
        }
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

static int write_full(int fd, const void *buf, size_t n)
{
    const uint8_t *p = buf;
    while (n > 0) {
        ssize_t r = send(fd, p, n, MSG_NOSIGNAL);
        if (r < 0 && errno == ENOTSOCK) {
            r = write(fd, p, n);
        }
        if (r < 0 && errno == EINTR) {
            continue;
        }
        if (r < 0) {
            return -errno;
        }
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

static int discard_bytes(int fd, uint64_t n)
{
    uint8_t buf[4096];
    while (n > 0) {
        size_t k = n < sizeof(buf) ? (size_t)n : sizeof(buf);
        int r = read_full(fd, buf, k);
        if (r < 0) {
            return r;
        }
        n -= k;
    }
    return 0;
}

static uint32_t wire_errno(int err)
{
    switch (-err) {
    case EPERM:
    case EROFS:
        return NBD_EPERM;
    case ENOMEM:
        return NBD_ENOMEM;
    case EINVAL:
        return NBD_EINVAL;
    case ENOSPC:
    case EDQUOT:
    case EFBIG:
        return NBD_ENOSPC;
    case EOVERFLOW:
        return NBD_EOVERFLOW;
    case ENOTSUP:
        return NBD_ENOTSUP;
    case ESHUTDOWN:
        return NBD_ESHUTDOWN;
    default:
        return NBD_EIO;
    }
}

/* ---- negotiation ---- */

static int opt_reply(struct conn *c, uint32_t opt, uint32_t type, const void *data, uint32_t len)
{
    uint8_t h[20];
    st_be64(h, NBD_REP_MAGIC);
    st_be32(h + 8, opt);
    st_be32(h + 12, type);
    st_be32(h + 16, len);
    int r = write_full(c->fd, h, sizeof(h));
    return r == 0 && len ? write_full(c->fd, data, len) : r;
}

static int opt_error(struct conn *c, uint32_t opt, uint32_t type, const char *msg)
{
    return opt_reply(c, opt, type, msg, (uint32_t)strlen(msg));
}

static uint16_t transmission_flags(const struct nbd_export *e)
{
    uint16_t f = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_DF |
                 NBD_FLAG_SEND_CACHE;
    if (e->writable) {
        f |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES;
    } else {
        f |= NBD_FLAG_READ_ONLY;
    }
    if (e->multi_conn) {
        f |= NBD_FLAG_CAN_MULTI_CONN;
    }
    return f;
}

static void list_one(void *arg, const struct nbd_export *e)
{
    struct conn *c = arg;
    size_t n = strlen(e->name);
    uint8_t *buf = malloc(4 + n);
    if (!buf) {
        return;
    }
    st_be32(buf, (uint32_t)n);
    memcpy(buf + 4, e->name, n);
    opt_reply(c, NBD_OPT_LIST, NBD_REP_SERVER, buf, (uint32_t)(4 + n));
    free(buf);
}

/* Parse "u32 len, name" at *p; returns a NUL-terminated copy or NULL. */
static char *take_string(const uint8_t *data, uint32_t len, uint32_t *pos)
{
    if (len - *pos < 4) {
        return NULL;
    }
    uint32_t n = ld_be32(data + *pos);
    *pos += 4;
    if (n > NBD_MAX_STRING || n > len - *pos) {
        return NULL;
    }
    char *s = strndup((const char *)data + *pos, n);
    *pos += n;
    return s;
}

static int send_info_export(struct conn *c, uint32_t opt, struct nbd_export *e)
{
    uint8_t b[12];
    st_be16(b, NBD_INFO_EXPORT);
    st_be64(b + 2, e->ops->size(e->opaque));
    st_be16(b + 10, transmission_flags(e));
    return opt_reply(c, opt, NBD_REP_INFO, b, sizeof(b));
}

static int handle_info_go(struct conn *c, uint32_t opt, const uint8_t *data, uint32_t len)
{
    uint32_t pos = 0;
    char *name = take_string(data, len, &pos);
    if (!name || len - pos < 2) {
        free(name);
        return opt_error(c, opt, NBD_REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO request");
    }
    uint16_t nreq = ld_be16(data + pos);
    pos += 2;
    if ((uint32_t)nreq * 2 != len - pos) {
        free(name);
        return opt_error(c, opt, NBD_REP_ERR_INVALID, "malformed information request list");
    }
    struct nbd_export *e = c->exports->find(c->exports->opaque, name);
    if (!e) {
        char msg[NBD_MAX_STRING + 64];
        snprintf(msg, sizeof(msg), "export '%s' not present", name);
        free(name);
        return opt_error(c, opt, NBD_REP_ERR_UNKNOWN, msg);
    }
    int r = send_info_export(c, opt, e);
    for (uint16_t i = 0; r == 0 && i < nreq; i++) {
        uint16_t t = ld_be16(data + pos + 2u * i);
        if (t == NBD_INFO_NAME) {
            size_t n = strlen(e->name);
            uint8_t *b = malloc(2 + n);
            if (!b) {
                r = -ENOMEM;
                break;
            }
            st_be16(b, NBD_INFO_NAME);
            memcpy(b + 2, e->name, n);
            r = opt_reply(c, opt, NBD_REP_INFO, b, (uint32_t)(2 + n));
            free(b);
        } else if (t == NBD_INFO_DESCRIPTION && e->description) {
            size_t n = strlen(e->description);
            uint8_t *b = malloc(2 + n);
            if (!b) {
                r = -ENOMEM;
                break;
            }
            st_be16(b, NBD_INFO_DESCRIPTION);
            memcpy(b + 2, e->description, n);
            r = opt_reply(c, opt, NBD_REP_INFO, b, (uint32_t)(2 + n));
            free(b);
        }
    }
    if (r == 0) {
        /* Block size constraints are always sent: any alignment, 4 KiB preferred. */
        uint8_t b[14];
        st_be16(b, NBD_INFO_BLOCK_SIZE);
        st_be32(b + 2, 1);
        st_be32(b + 6, 4096);
        st_be32(b + 10, NBD_MAX_REQUEST);
        r = opt_reply(c, opt, NBD_REP_INFO, b, sizeof(b));
    }
    if (r == 0) {
        r = opt_reply(c, opt, NBD_REP_ACK, NULL, 0);
    }
    free(name);
    if (r == 0 && opt == NBD_OPT_GO) {
        c->exp = e;
        return 1; /* enter transmission */
    }
    c->exports->release(c->exports->opaque, e);
    return r;
}

static int handle_meta(struct conn *c, uint32_t opt, const uint8_t *data, uint32_t len)
{
    if (opt == NBD_OPT_SET_META_CONTEXT && !c->structured) {
        return opt_error(c, opt, NBD_REP_ERR_INVALID,
                         "structured replies must be negotiated before meta contexts");
    }
    uint32_t pos = 0;
    char *name = take_string(data, len, &pos);
    if (!name || len - pos < 4) {
        free(name);
        return opt_error(c, opt, NBD_REP_ERR_INVALID, "malformed meta context request");
    }
    struct nbd_export *e = c->exports->find(c->exports->opaque, name);
    free(name);
    if (!e) {
        return opt_error(c, opt, NBD_REP_ERR_UNKNOWN, "export not present");
    }
    c->exports->release(c->exports->opaque, e);
    uint32_t nq = ld_be32(data + pos);
    pos += 4;
    bool sel[3] = {false, false, false};
    if (nq == 0 && opt == NBD_OPT_LIST_META_CONTEXT) {
        sel[CTX_BASE] = sel[CTX_DEPTH] = true;
    }
    for (uint32_t i = 0; i < nq; i++) {
        char *q = take_string(data, len, &pos);
        if (!q) {
            return opt_error(c, opt, NBD_REP_ERR_INVALID, "malformed meta context query");
        }
        bool list = opt == NBD_OPT_LIST_META_CONTEXT;
        if (!strcmp(q, "base:allocation") || (list && !strcmp(q, "base:"))) {
            sel[CTX_BASE] = true;
        } else if (!strcmp(q, "qemu:allocation-depth") || (list && !strcmp(q, "qemu:"))) {
            sel[CTX_DEPTH] = true;
        }
        free(q);
    }
    if (pos != len) {
        return opt_error(c, opt, NBD_REP_ERR_INVALID, "trailing bytes in meta context request");
    }
    for (int id = 1; id <= 2; id++) {
        if (opt == NBD_OPT_SET_META_CONTEXT) {
            c->ctx[id] = sel[id];
        }
        if (!sel[id]) {
            continue;
        }
        size_t n = strlen(ctx_names[id]);
        uint8_t b[64];
        st_be32(b, (uint32_t)id);
        memcpy(b + 4, ctx_names[id], n);
        int r = opt_reply(c, opt, NBD_REP_META_CONTEXT, b, (uint32_t)(4 + n));
        if (r < 0) {
            return r;
        }
    }
    return opt_reply(c, opt, NBD_REP_ACK, NULL, 0);
}

/* Returns 1 when transmission starts, 0 on a clean abort, < 0 on failure. */
static int negotiate(struct conn *c)
{
    uint8_t hello[18];
    st_be64(hello, NBD_MAGIC);
    st_be64(hello + 8, NBD_OPTS_MAGIC);
    st_be16(hello + 16, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
    int r = write_full(c->fd, hello, sizeof(hello));
    uint8_t cf[4];
    if (r == 0) {
        r = read_full(c->fd, cf, 4);
    }
    if (r < 0) {
        return r;
    }
    uint32_t cflags = ld_be32(cf);
    if (cflags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) {
        return -EPROTO; /* unknown client flags: the spec says disconnect */
    }
    c->no_zeroes = cflags & NBD_FLAG_C_NO_ZEROES;
    for (;;) {
        uint8_t h[16];
        r = read_full(c->fd, h, sizeof(h));
        if (r < 0) {
            return r;
        }
        if (ld_be64(h) != NBD_OPTS_MAGIC) {
            return -EPROTO;
        }
        uint32_t opt = ld_be32(h + 8), len = ld_be32(h + 12);
        if (len > NBD_MAX_OPTION) {
            r = discard_bytes(c->fd, len);
            if (r == 0) {
                r = opt_error(c, opt, NBD_REP_ERR_TOO_BIG, "option payload too large");
            }
            if (r < 0) {
                return r;
            }
            continue;
        }
        uint8_t *data = malloc(len ? len : 1);
        if (!data) {
            return -ENOMEM;
        }
        r = read_full(c->fd, data, len);
        if (r < 0) {
            free(data);
            return r;
        }
        switch (opt) {
        case NBD_OPT_EXPORT_NAME: {
            char *name = strndup((const char *)data, len);
            struct nbd_export *e = name ? c->exports->find(c->exports->opaque, name) : NULL;
            free(name);
            free(data);
            if (!e) {
                return -ENOENT; /* no way to report an error for EXPORT_NAME */
            }
            uint8_t b[10 + 124] = {0};
            st_be64(b, e->ops->size(e->opaque));
            st_be16(b + 8, transmission_flags(e));
            c->exp = e;
            r = write_full(c->fd, b, c->no_zeroes ? 10 : sizeof(b));
            return r < 0 ? r : 1;
        }
        case NBD_OPT_ABORT:
            free(data);
            opt_reply(c, opt, NBD_REP_ACK, NULL, 0);
            return 0;
        case NBD_OPT_LIST:
            if (len) {
                r = opt_error(c, opt, NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
            } else {
                c->exports->list(c->exports->opaque, list_one, c);
                r = opt_reply(c, opt, NBD_REP_ACK, NULL, 0);
            }
            break;
        case NBD_OPT_STARTTLS:
            r = opt_error(c, opt, NBD_REP_ERR_POLICY, "TLS is not supported by this server");
            break;
        case NBD_OPT_STRUCTURED_REPLY:
            if (len) {
                r = opt_error(c, opt, NBD_REP_ERR_INVALID, "option takes no data");
            } else {
                c->structured = true;
                r = opt_reply(c, opt, NBD_REP_ACK, NULL, 0);
            }
            break;
        case NBD_OPT_INFO:
        case NBD_OPT_GO:
            r = handle_info_go(c, opt, data, len);
            break;
        case NBD_OPT_LIST_META_CONTEXT:
        case NBD_OPT_SET_META_CONTEXT:
            r = handle_meta(c, opt, data, len);
            break;
        default:
            r = opt_error(c, opt, NBD_REP_ERR_UNSUP, "option not supported");
            break;
        }
        free(data);
        if (r != 0) {
            return r;
        }
    }
}

/* ---- transmission ----
 *
 * Workers of one connection (w[0] is the thread that called nbd_serve, the others are
 * started on demand up to exports->threads):
 *
 *   take rlock --> read one request (and a WRITE's payload) --> drop rlock --> execute
 *        ^                                                                    |
 *        '------------------- take wlock, send the whole reply, drop wlock <--'
 *
 * T1. Requests are framed by whoever holds rlock, in stream order; each gets the next seq.
 * T2. A reply goes out whole under wlock: replies of different requests never interleave,
 *     but they leave in completion order (the client matches them by cookie).
 * T3. At most exports->threads requests are executing at once, and their payload buffers
 *     total at most NBD_CONN_MEM bytes (or one request, whatever its size): a worker holding
 *     rlock waits for room, so the client is not read faster than requests complete.
 * T4. A FLUSH waits until every write (WRITE, WRITE_ZEROES, TRIM) received before it has
 *     completed, then flushes: it covers all of them, not only those already answered.
 * T5. DISC, end of stream or a framing error stop the reading; requests already read still
 *     execute and are answered (an I/O error on the socket shuts it down, so nobody blocks),
 *     and nbd_serve returns only once every worker has finished.
 *
 * Lock order: rlock, then wlock, then lock (the state below); the export's own locks are
 * taken with none of them held except during the FLUSH wait (lock, released by the wait).
 */

#define NBD_CONN_MEM (64u << 20) /* payload bytes in flight per connection (T3) */
#define RBUF_SIZE    (64u << 10) /* receive buffer: several small requests per read() */
#define KEEP_BUF     (4u << 20)  /* a worker keeps a payload buffer up to this size */

struct req {
    uint16_t flags, type;
    uint64_t cookie, off;
    uint32_t len;
    uint64_t seq;
    size_t mem; /* payload bytes counted in mem_in_flight */
};

struct worker {
    struct conn *c;
    pthread_t th;
    uint8_t *buf;
    size_t cap;
    /* Under c->lock: the write being executed, for FLUSH ordering (T4). */
    bool writing;
    uint64_t seq;
};

struct xmit {
    pthread_mutex_t rlock; /* request side (T1): rbuf, rpos, rlen */
    uint8_t *rbuf;
    size_t rpos, rlen;
    pthread_mutex_t wlock; /* reply side (T2) */
    pthread_mutex_t lock;  /* everything below */
    pthread_cond_t cond;   /* memory freed, a write completed, quit */
    struct worker *w;
    unsigned nworkers, max_workers;
    unsigned idle; /* workers not executing a request */
    uint64_t next_seq;
    size_t mem_in_flight;
    unsigned waiters; /* threads in cond_wait */
    bool quit;
    int err; /* first error that ended the connection (0: DISC or end of stream) */
};

static bool is_write(uint16_t type)
{
    return type == NBD_CMD_WRITE || type == NBD_CMD_WRITE_ZEROES || type == NBD_CMD_TRIM;
}

/* Stop reading requests (T5); with an error, shut the socket down so that a worker blocked
 * in read() or send() returns. */
static void conn_quit(struct conn *c, int err)
{
    struct xmit *x = c->x;
    pthread_mutex_lock(&x->lock);
    if (!x->quit || (err < 0 && x->err == 0)) {
        x->err = err == -ECONNRESET ? 0 : err;
    }
    x->quit = true;
    if (x->waiters) {
        pthread_cond_broadcast(&x->cond);
    }
    pthread_mutex_unlock(&x->lock);
    if (err < 0 && err != -ECONNRESET) {
        shutdown(c->fd, SHUT_RDWR);
    }
}

/* Send iov[0..n) whole; caller holds wlock. */
static int send_iov(struct conn *c, struct iovec *iov, int n)
{
    while (n > 0) {
        struct msghdr m = {.msg_iov = iov, .msg_iovlen = (size_t)n};
        ssize_t r = sendmsg(c->fd, &m, MSG_NOSIGNAL);
        if (r < 0 && errno == ENOTSOCK) {
            r = writev(c->fd, iov, n);
        }
        if (r < 0 && errno == EINTR) {
            continue;
        }
        if (r < 0) {
            return -errno;
        }
        size_t k = (size_t)r;
        while (n > 0 && k >= iov->iov_len) {
            k -= iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + k;
            iov->iov_len -= k;
        }
    }
    return 0;
}

static int send_locked(struct conn *c, struct iovec *iov, int n)
{
    pthread_mutex_lock(&c->x->wlock);
    int r = send_iov(c, iov, n);
    pthread_mutex_unlock(&c->x->wlock);
    return r;
}

/* A simple reply, or one structured chunk (hdr has room for 20 bytes); returns the header
 * length to send. */
static size_t chunk_header(uint8_t *h, uint64_t cookie, uint16_t flags, uint16_t type, uint32_t len)
{
    st_be32(h, NBD_STRUCTURED_REPLY_MAGIC);
    st_be16(h + 4, flags);
    st_be16(h + 6, type);
    st_be64(h + 8, cookie);
    st_be32(h + 16, len);
    return 20;
}

static size_t simple_header(uint8_t *h, uint64_t cookie, uint32_t err)
{
    st_be32(h, NBD_SIMPLE_REPLY_MAGIC);
    st_be32(h + 4, err);
    st_be64(h + 8, cookie);
    return 16;
}

/* The reply to a request without data: success, or an error with an optional message (the
 * message goes out only with structured replies). */
static int reply_error_msg(struct conn *c, uint64_t cookie, int err, const char *msg)
{
    uint8_t h[20], b[6];
    struct iovec iov[3];
    int n = 1;
    if (!c->structured) {
        iov[0] = (struct iovec){h, simple_header(h, cookie, err ? wire_errno(err) : 0)};
    } else if (!err) {
        iov[0] =
            (struct iovec){h, chunk_header(h, cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, 0)};
    } else {
        uint16_t mlen = msg ? (uint16_t)strlen(msg) : 0;
        st_be32(b, wire_errno(err));
        st_be16(b + 4, mlen);
        iov[0] = (struct iovec){
            h, chunk_header(h, cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, 6u + mlen)};
        iov[n++] = (struct iovec){b, 6};
        if (mlen) {
            iov[n++] = (struct iovec){(void *)msg, mlen};
        }
    }
    return send_locked(c, iov, n);
}

static int reply_status(struct conn *c, uint64_t cookie, int err)
{
    return reply_error_msg(c, cookie, err, NULL);
}

/* READ's data: one simple reply or one OFFSET_DATA chunk. */
static int reply_data(struct conn *c, const struct req *q, const void *data)
{
    uint8_t h[28];
    struct iovec iov[2];
    if (!c->structured) {
        iov[0] = (struct iovec){h, simple_header(h, q->cookie, 0)};
    } else {
        chunk_header(h, q->cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, 8 + q->len);
        st_be64(h + 20, q->off);
        iov[0] = (struct iovec){h, 28};
    }
    iov[1] = (struct iovec){(void *)data, q->len};
    return send_locked(c, iov, q->len ? 2 : 1);
}

/* Extents of one context for [off, off+len) into buf (after its 4-byte context id);
 * returns the count or -errno. */
static int collect_extents(struct nbd_export *e, int id, uint64_t off, uint32_t len, uint16_t flags,
                           uint8_t *buf)
{
    uint32_t count = 0;
    uint64_t pos = off, end = off + len;
    while (pos < end && count < MAX_EXTENTS) {
        struct nbd_extent x;
        int err = id == CTX_BASE ? e->ops->block_status(e->opaque, pos, end - pos, &x)
                                 : e->ops->alloc_depth(e->opaque, pos, end - pos, &x);
        if (err < 0 || x.len == 0) {
            return err < 0 ? err : -EIO;
        }
        uint64_t l = x.len < end - pos ? x.len : end - pos;
        if (l > 0xfffff000u) {
            l = 0xfffff000u;
        }
        if (count && ld_be32(buf + 8 * (count - 1) + 4) == x.flags) {
            uint32_t prev = ld_be32(buf + 8 * (count - 1));
            if ((uint64_t)prev + l <= 0xfffff000u) {
                st_be32(buf + 8 * (count - 1), (uint32_t)(prev + l));
                pos += l;
                continue;
            }
        }
        st_be32(buf + 8 * count, (uint32_t)l);
        st_be32(buf + 8 * count + 4, x.flags);
        count++;
        pos += l;
        if (flags & NBD_CMD_FLAG_REQ_ONE) {
            break;
        }
    }
    return (int)count;
}

/* BLOCK_STATUS: one chunk per negotiated context, sent together (T2). */
static int do_block_status(struct conn *c, const struct req *q)
{
    int ids[2], n = 0;
    for (int id = 1; id <= 2; id++) {
        if (c->ctx[id]) {
            ids[n++] = id;
        }
    }
    if (!c->structured || n == 0) {
        return reply_status(c, q->cookie, -EINVAL);
    }
    size_t per = 4 + 8 * MAX_EXTENTS;
    uint8_t *buf = malloc(per * (size_t)n);
    if (!buf) {
        return reply_status(c, q->cookie, -ENOMEM);
    }
    uint8_t h[2][20];
    struct iovec iov[4];
    int r = 0;
    for (int k = 0; k < n; k++) {
        uint8_t *b = buf + per * (size_t)k;
        int count = collect_extents(c->exp, ids[k], q->off, q->len, q->flags, b + 4);
        if (count < 0) {
            free(buf);
            return reply_status(c, q->cookie, count);
        }
        st_be32(b, (uint32_t)ids[k]);
        uint32_t blen = 4 + 8 * (uint32_t)count;
        iov[2 * k] =
            (struct iovec){h[k], chunk_header(h[k], q->cookie, k == n - 1 ? NBD_REPLY_FLAG_DONE : 0,
                                              NBD_REPLY_TYPE_BLOCK_STATUS, blen)};
        iov[2 * k + 1] = (struct iovec){b, blen};
    }
    r = send_locked(c, iov, 2 * n);
    free(buf);
    return r;
}

/* Next n bytes of the request stream (rlock held): from the receive buffer, then from the
 * socket (large payloads straight into dst). */
static int recv_bytes(struct conn *c, void *dst, size_t n)
{
    struct xmit *x = c->x;
    uint8_t *p = dst;
    while (n > 0) {
        if (x->rpos < x->rlen) {
            size_t k = x->rlen - x->rpos < n ? x->rlen - x->rpos : n;
            memcpy(p, x->rbuf + x->rpos, k);
            x->rpos += k;
            p += k;
            n -= k;
            continue;
        }
        bool direct = n >= RBUF_SIZE;
        ssize_t r = read(c->fd, direct ? p : x->rbuf, direct ? n : RBUF_SIZE);
        if (r < 0 && errno == EINTR) {
            continue;
        }
        if (r <= 0) {
            return r == 0 ? -ECONNRESET : -errno;
        }
        if (direct) {
            p += r;
            n -= (size_t)r;
        } else {
            x->rpos = 0;
            x->rlen = (size_t)r;
        }
    }
    return 0;
}

/* Room for len payload bytes (T3); rlock held. Returns false if the connection is ending. */
static bool take_mem(struct xmit *x, size_t len)
{
    pthread_mutex_lock(&x->lock);
    while (!x->quit && x->mem_in_flight > 0 && x->mem_in_flight + len > NBD_CONN_MEM) {
        x->waiters++;
        pthread_cond_wait(&x->cond, &x->lock);
        x->waiters--;
    }
    bool ok = !x->quit;
    if (ok) {
        x->mem_in_flight += len;
    }
    pthread_mutex_unlock(&x->lock);
    return ok;
}

static void *worker_main(void *arg);

/* Start one more worker if none is free to read the next request; x->lock held. */
static void maybe_spawn_locked(struct xmit *x)
{
    if (x->idle > 0 || x->nworkers >= x->max_workers || x->quit) {
        return;
    }
    struct worker *w = &x->w[x->nworkers];
    if (pthread_create(&w->th, NULL, worker_main, w) == 0) {
        x->nworkers++;
        x->idle++;
    }
}

/* Read the next request (rlock held). Returns 1 with *q filled (and a WRITE's payload in
 * w->buf), 0 at DISC, < 0 when the stream cannot go on. */
static int next_request(struct conn *c, struct worker *w, struct req *q)
{
    struct xmit *x = c->x;
    for (;;) {
        uint8_t h[28];
        int r = recv_bytes(c, h, sizeof(h));
        if (r < 0) {
            return r;
        }
        if (ld_be32(h) != NBD_REQUEST_MAGIC) {
            return -EPROTO;
        }
        *q = (struct req){.flags = ld_be16(h + 4),
                          .type = ld_be16(h + 6),
                          .cookie = ld_be64(h + 8),
                          .off = ld_be64(h + 16),
                          .len = ld_be32(h + 24)};
        if (q->type == NBD_CMD_DISC) {
            return 0;
        }
        bool data = q->type == NBD_CMD_READ || q->type == NBD_CMD_WRITE;
        if (data && q->len > NBD_MAX_REQUEST) {
            char msg[96];
            snprintf(msg, sizeof(msg), "request of %u bytes is larger than the limit of %u bytes",
                     (unsigned)q->len, NBD_MAX_REQUEST);
            r = reply_error_msg(c, q->cookie, -EOVERFLOW, msg);
            if (q->type == NBD_CMD_WRITE) {
                /* Its payload cannot be skipped safely: hang up after the error. */
                return -EPROTO;
            }
            if (r < 0) {
                return r;
            }
            continue;
        }
        if (data) {
            if (!take_mem(x, q->len)) {
                return -ECONNRESET;
            }
            q->mem = q->len;
            if (w->cap < q->len || !w->buf) {
                uint8_t *nb = realloc(w->buf, q->len ? q->len : 1);
                if (!nb) {
                    return -ENOMEM;
                }
                w->buf = nb;
                w->cap = q->len ? q->len : 1;
            }
        }
        if (q->type == NBD_CMD_WRITE) {
            r = recv_bytes(c, w->buf, q->len);
            if (r < 0) {
                return r;
            }
        }
        pthread_mutex_lock(&x->lock);
        q->seq = x->next_seq++;
        w->writing = is_write(q->type);
        w->seq = q->seq;
        x->idle--;
        maybe_spawn_locked(x);
        pthread_mutex_unlock(&x->lock);
        return 1;
    }
}

/* T4: wait until no write received before the flush q is still executing. */
static void flush_barrier(struct xmit *x, const struct req *q)
{
    pthread_mutex_lock(&x->lock);
    for (;;) {
        bool older = false;
        for (unsigned i = 0; i < x->nworkers && !older; i++) {
            older = x->w[i].writing && x->w[i].seq < q->seq;
        }
        if (!older) {
            break;
        }
        x->waiters++;
        pthread_cond_wait(&x->cond, &x->lock);
        x->waiters--;
    }
    pthread_mutex_unlock(&x->lock);
}

/* Execute one request and send its reply; returns < 0 only when the socket failed. */
static int execute(struct conn *c, struct worker *w, const struct req *q)
{
    struct nbd_export *e = c->exp;
    bool in_range = q->off <= c->size && q->len <= c->size - q->off;
    bool fua = q->flags & NBD_CMD_FLAG_FUA;
    int err;
    switch (q->type) {
    case NBD_CMD_READ:
        err = in_range ? e->ops->pread(e->opaque, w->buf, q->len, q->off) : -EINVAL;
        return err < 0 ? reply_status(c, q->cookie, err) : reply_data(c, q, w->buf);
    case NBD_CMD_WRITE:
        err = !e->writable ? -EPERM
              : !in_range  ? -ENOSPC
                           : e->ops->pwrite(e->opaque, w->buf, q->len, q->off, fua);
        break;
    case NBD_CMD_FLUSH:
        flush_barrier(c->x, q);
        err = e->ops->flush(e->opaque);
        break;
    case NBD_CMD_TRIM:
        err = !e->writable ? -EPERM
              : !in_range  ? -EINVAL
                           : e->ops->trim(e->opaque, q->len, q->off, fua);
        break;
    case NBD_CMD_WRITE_ZEROES:
        err =
            !e->writable ? -EPERM
            : !in_range  ? -ENOSPC
            : (q->flags & NBD_CMD_FLAG_FAST_ZERO)
                ? -ENOTSUP
                : e->ops->zero(e->opaque, q->len, q->off, !(q->flags & NBD_CMD_FLAG_NO_HOLE), fua);
        break;
    case NBD_CMD_CACHE:
        err = in_range ? 0 : -EINVAL;
        break;
    case NBD_CMD_BLOCK_STATUS:
        return in_range && q->len ? do_block_status(c, q) : reply_status(c, q->cookie, -EINVAL);
    default:
        err = -EINVAL;
        break;
    }
    if (w->writing) {
        /* Completed: a later FLUSH need not wait for it (T4). */
        struct xmit *x = c->x;
        pthread_mutex_lock(&x->lock);
        w->writing = false;
        if (x->waiters) {
            pthread_cond_broadcast(&x->cond);
        }
        pthread_mutex_unlock(&x->lock);
    }
    return reply_status(c, q->cookie, err);
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    struct conn *c = w->c;
    struct xmit *x = c->x;
    for (;;) {
        struct req q;
        pthread_mutex_lock(&x->rlock);
        pthread_mutex_lock(&x->lock);
        bool quit = x->quit;
        pthread_mutex_unlock(&x->lock);
        int r = quit ? 0 : next_request(c, w, &q);
        if (r <= 0) {
            /* Still holding rlock: no other worker may frame what follows a DISC or a bad
             * request (T5). */
            if (!quit) {
                conn_quit(c, r);
            }
            pthread_mutex_unlock(&x->rlock);
            break;
        }
        pthread_mutex_unlock(&x->rlock);
        r = execute(c, w, &q);
        pthread_mutex_lock(&x->lock);
        w->writing = false;
        x->idle++;
        x->mem_in_flight -= q.mem;
        if (x->waiters && q.mem) {
            pthread_cond_broadcast(&x->cond);
        }
        pthread_mutex_unlock(&x->lock);
        if (w->cap > KEEP_BUF) {
            free(w->buf);
            w->buf = NULL;
            w->cap = 0;
        }
        if (r < 0) {
            conn_quit(c, r);
            break;
        }
    }
    free(w->buf);
    w->buf = NULL;
    return NULL;
}

static int transmit(struct conn *c)
{
    struct xmit x = {.max_workers = c->exports->threads ? c->exports->threads : 1};
    if (x.max_workers > NBD_MAX_THREADS) {
        x.max_workers = NBD_MAX_THREADS;
    }
    x.rbuf = malloc(RBUF_SIZE);
    x.w = calloc(x.max_workers, sizeof(*x.w));
    if (!x.rbuf || !x.w) {
        free(x.rbuf);
        free(x.w);
        return -ENOMEM;
    }
    for (unsigned i = 0; i < x.max_workers; i++) {
        x.w[i].c = c;
    }
    pthread_mutex_init(&x.rlock, NULL);
    pthread_mutex_init(&x.wlock, NULL);
    pthread_mutex_init(&x.lock, NULL);
    pthread_cond_init(&x.cond, NULL);
    c->x = &x;
    c->size = c->exp->ops->size(c->exp->opaque);
    x.nworkers = 1;
    x.idle = 1;
    worker_main(&x.w[0]);
    /* w[0] left after quit, so no worker is started any more (maybe_spawn_locked). */
    pthread_mutex_lock(&x.lock);
    unsigned n = x.nworkers;
    pthread_mutex_unlock(&x.lock);
    for (unsigned i = 1; i < n; i++) {
        pthread_join(x.w[i].th, NULL);
    }
    c->x = NULL;
    pthread_cond_destroy(&x.cond);
    pthread_mutex_destroy(&x.lock);
    pthread_mutex_destroy(&x.wlock);
    pthread_mutex_destroy(&x.rlock);
    free(x.rbuf);
    free(x.w);
    return x.err;
}

int nbd_serve(int fd, const struct nbd_exports *exports)
{
    struct conn c = {.fd = fd, .exports = exports};
    int r = negotiate(&c);
    if (r == 1) {
        r = transmit(&c);
    }
    if (c.exp) {
        exports->release(exports->opaque, c.exp);
    }
    return r == -ECONNRESET ? 0 : r;
}
