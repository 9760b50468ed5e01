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
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "nbd/nbd-proto.h"
#include "nbd/nbd-server.h"
#include "util/bswap.h"

#define NBD_MAX_OPTION (64u << 10)
#define MAX_EXTENTS    2048

enum { CTX_BASE = 1, CTX_DEPTH = 2 };
static const char *const ctx_names[] = {NULL, "base:allocation", "qemu:allocation-depth"};

struct conn {
    int fd;
    const struct nbd_exports *exports;
    struct nbd_export *exp;
    bool structured;
    bool no_zeroes;
    bool ctx[3];
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

/* ---- transmission ---- */

static int simple_reply(struct conn *c, uint64_t cookie, uint32_t err, const void *data,
                        uint32_t len)
{
    uint8_t h[16];
    st_be32(h, NBD_SIMPLE_REPLY_MAGIC);
    st_be32(h + 4, err);
    st_be64(h + 8, cookie);
    int r = write_full(c->fd, h, sizeof(h));
    return r == 0 && data && len ? write_full(c->fd, data, len) : r;
}

static int chunk(struct conn *c, uint64_t cookie, uint16_t flags, uint16_t type,
                 const void *payload, uint32_t len, const void *extra, uint32_t extra_len)
{
    uint8_t h[20];
    st_be32(h, NBD_STRUCTURED_REPLY_MAGIC);
    st_be16(h + 4, flags);
    st_be16(h + 6, type);
    st_be64(h + 8, cookie);
    st_be32(h + 16, len + extra_len);
    int r = write_full(c->fd, h, sizeof(h));
    if (r == 0 && len) {
        r = write_full(c->fd, payload, len);
    }
    if (r == 0 && extra_len) {
        r = write_full(c->fd, extra, extra_len);
    }
    return r;
}

static int reply_status(struct conn *c, uint64_t cookie, int err)
{
    if (!c->structured) {
        return simple_reply(c, cookie, err ? wire_errno(err) : 0, NULL, 0);
    }
    if (!err) {
        return chunk(c, cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, NULL, 0, NULL, 0);
    }
    uint8_t b[6];
    st_be32(b, wire_errno(err));
    st_be16(b + 4, 0);
    return chunk(c, cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, b, sizeof(b), NULL, 0);
}

/* An error reply that says why (the message goes out only with structured replies). */
static int reply_error_msg(struct conn *c, uint64_t cookie, int err, const char *msg)
{
    if (!c->structured) {
        return reply_status(c, cookie, err);
    }
    uint8_t b[6];
    uint16_t n = (uint16_t)strlen(msg);
    st_be32(b, wire_errno(err));
    st_be16(b + 4, n);
    return chunk(c, cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, b, sizeof(b), msg, n);
}

static int do_block_status(struct conn *c, uint64_t cookie, uint64_t off, uint32_t len,
                           uint16_t flags)
{
    struct nbd_export *e = c->exp;
    int ids[2], n = 0;
    for (int id = 1; id <= 2; id++) {
        if (c->ctx[id]) {
            ids[n++] = id;
        }
    }
    if (!c->structured || n == 0) {
        return reply_status(c, cookie, -EINVAL);
    }
    uint8_t *buf = malloc(4 + 8 * MAX_EXTENTS);
    if (!buf) {
        return reply_status(c, cookie, -ENOMEM);
    }
    int r = 0;
    for (int k = 0; k < n && r == 0; k++) {
        uint32_t count = 0;
        uint64_t pos = off, end = off + len;
        int err = 0;
        while (pos < end && count < MAX_EXTENTS) {
            struct nbd_extent x;
            err = ids[k] == CTX_BASE ? e->ops->block_status(e->opaque, pos, end - pos, &x)
                                     : e->ops->alloc_depth(e->opaque, pos, end - pos, &x);
            if (err < 0 || x.len == 0) {
                err = err < 0 ? err : -EIO;
                break;
            }
            uint64_t l = x.len < end - pos ? x.len : end - pos;
            if (l > 0xfffff000u) {
                l = 0xfffff000u;
            }
            if (count && ld_be32(buf + 4 + 8 * (count - 1) + 4) == x.flags) {
                uint32_t prev = ld_be32(buf + 4 + 8 * (count - 1));
                if ((uint64_t)prev + l <= 0xfffff000u) {
                    st_be32(buf + 4 + 8 * (count - 1), (uint32_t)(prev + l));
                    pos += l;
                    continue;
                }
            }
            st_be32(buf + 4 + 8 * count, (uint32_t)l);
            st_be32(buf + 4 + 8 * count + 4, x.flags);
            count++;
            pos += l;
            if (flags & NBD_CMD_FLAG_REQ_ONE) {
                break;
            }
        }
        if (err < 0) {
            free(buf);
            return reply_status(c, cookie, err);
        }
        st_be32(buf, (uint32_t)ids[k]);
        r = chunk(c, cookie, k == n - 1 ? NBD_REPLY_FLAG_DONE : 0, NBD_REPLY_TYPE_BLOCK_STATUS, buf,
                  4 + 8 * count, NULL, 0);
    }
    free(buf);
    return r;
}

static int transmit(struct conn *c)
{
    struct nbd_export *e = c->exp;
    uint8_t *buf = NULL;
    int r = 0;
    for (;;) {
        uint8_t h[28];
        r = read_full(c->fd, h, sizeof(h));
        if (r < 0) {
            break;
        }
        if (ld_be32(h) != NBD_REQUEST_MAGIC) {
            r = -EPROTO;
            break;
        }
        uint16_t flags = ld_be16(h + 4), type = ld_be16(h + 6);
        uint64_t cookie = ld_be64(h + 8), off = ld_be64(h + 16);
        uint32_t len = ld_be32(h + 24);
        uint64_t size = e->ops->size(e->opaque);
        bool in_range = off <= size && len <= size - off;
        bool fua = flags & NBD_CMD_FLAG_FUA;
        if (type == NBD_CMD_DISC) {
            r = 0;
            break;
        }
        if ((type == NBD_CMD_READ || type == NBD_CMD_WRITE) && len > NBD_MAX_REQUEST) {
            char msg[96];
            snprintf(msg, sizeof(msg), "request of %u bytes is larger than the limit of %u bytes",
                     (unsigned)len, NBD_MAX_REQUEST);
            r = reply_error_msg(c, cookie, -EOVERFLOW, msg);
            if (type == NBD_CMD_WRITE) {
                /* Its payload cannot be skipped safely: hang up after the error. */
                r = -EPROTO;
                break;
            }
            if (r < 0) {
                break;
            }
            continue;
        }
        if (type == NBD_CMD_READ || type == NBD_CMD_WRITE) {
            uint8_t *nb = realloc(buf, len ? len : 1);
            if (!nb) {
                r = -ENOMEM;
                break;
            }
            buf = nb;
        }
        int err = 0;
        switch (type) {
        case NBD_CMD_READ:
            err = in_range ? e->ops->pread(e->opaque, buf, len, off) : -EINVAL;
            if (err < 0) {
                r = reply_status(c, cookie, err);
            } else if (!c->structured) {
                r = simple_reply(c, cookie, 0, buf, len);
            } else {
                uint8_t o[8];
                st_be64(o, off);
                r = chunk(c, cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, o, 8, buf,
                          len);
            }
            break;
        case NBD_CMD_WRITE:
            r = read_full(c->fd, buf, len);
            if (r < 0) {
                break;
            }
            err = !e->writable ? -EPERM
                  : !in_range  ? -ENOSPC
                               : e->ops->pwrite(e->opaque, buf, len, off, fua);
            r = reply_status(c, cookie, err);
            break;
        case NBD_CMD_FLUSH:
            r = reply_status(c, cookie, e->ops->flush(e->opaque));
            break;
        case NBD_CMD_TRIM:
            err = !e->writable ? -EPERM
                  : !in_range  ? -EINVAL
                               : e->ops->trim(e->opaque, len, off, fua);
            r = reply_status(c, cookie, err);
            break;
        case NBD_CMD_WRITE_ZEROES:
            err = !e->writable ? -EPERM
                  : !in_range  ? -ENOSPC
                  : (flags & NBD_CMD_FLAG_FAST_ZERO)
                      ? -ENOTSUP
                      : e->ops->zero(e->opaque, len, off, !(flags & NBD_CMD_FLAG_NO_HOLE), fua);
            r = reply_status(c, cookie, err);
            break;
        case NBD_CMD_CACHE:
            r = reply_status(c, cookie, in_range ? 0 : -EINVAL);
            break;
        case NBD_CMD_BLOCK_STATUS:
            r = in_range && len ? do_block_status(c, cookie, off, len, flags)
                                : reply_status(c, cookie, -EINVAL);
            break;
        default:
            r = reply_status(c, cookie, -EINVAL);
            break;
        }
        if (r < 0) {
            break;
        }
    }
    free(buf);
    return r;
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
