/*
 * fuzz-nbd: the input is the byte stream an NBD client sends (handshake options, then
 * transmission requests with their payloads). The real server, nbd_serve(), runs on one end of
 * a socketpair against two in-memory exports ("" and "disk": writable; "ro": read-only with a
 * description); fuzz-peer.c sends the input, shuts down the write side and collects the
 * replies. Every input is served twice: by the ordered server (nbd_exports.threads = 0, one
 * request at a time) and by the threaded one (4 workers, replies in completion order).
 *
 * Oracles, besides the sanitizers:
 *   E1. the server calls the export only inside the export (offset + length <= size), never
 *       with a READ/WRITE longer than NBD_MAX_REQUEST, and releases every export it found;
 *   E2. the reply stream, replayed in lockstep with the input by the model below, is well
 *       framed: the greeting; one reply series per option, each reply naming the option it
 *       answers and ending with an ACK or an error; after GO (ACK) or EXPORT_NAME, one reply
 *       per request, in order, carrying that request's cookie (the server never answers with
 *       a cookie it was not sent), simple or structured as negotiated; structured chunks end
 *       with exactly one DONE; read data lies inside the request and matches what the export
 *       returned for it; block-status chunks use a negotiated context, one extent with
 *       REQ_ONE, and never describe more than was asked;
 *   E3. the server sends nothing after a disconnect, an abort, or a request it cannot frame.
 * The model stops quietly where the input runs out (the server then sees EOF mid-message).
 * For the threaded server the model matches replies to requests by cookie instead of order
 * (inputs with two requests of one cookie are not modelled): each reply answers a request
 * not answered yet, goes out whole, and its read data is what one of the export's reads
 * returned; when the stream ends cleanly (EOF or DISC, not a protocol error, after which the
 * socket is shut down) every request has been answered.
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz-common.h"
#include "fuzz-peer.h"
#include "nbd/nbd-proto.h"
#include "nbd/nbd-server.h"
#include "util/bswap.h"

#define EXPORT_SIZE ((1u << 20) + 1536) /* not a multiple of the 4 KiB block */
#define BLOCK       4096u
#define NBLOCKS     ((EXPORT_SIZE + BLOCK - 1) / BLOCK)
#define MAX_KEEP    (8u << 20) /* reply bytes kept for the model */
#define MAX_READS   4096

/* FUZZ_AVOID names (see fuzz-common.h): none. */

enum { B_DATA, B_ZERO, B_HOLE, B_BACKING };

struct mem_export {
    pthread_mutex_t lock; /* the threaded server calls the export from several workers */
    uint8_t *data;
    uint8_t state[NBLOCKS];
    /* Successful preads in order (offset, length, FNV-1a of the data): the model checks that
     * the reply of the k-th successful read carries exactly those bytes. */
    struct {
        uint64_t off;
        uint32_t len;
        uint64_t hash;
    } reads[MAX_READS];
    unsigned nreads;
};

static struct mem_export rw_exp, ro_exp;
static int refs;

static uint64_t fnv(const uint8_t *p, size_t n, uint64_t h)
{
    for (size_t i = 0; i < n; i++) {
        h = (h ^ p[i]) * 0x100000001b3ull;
    }
    return h;
}

static void check_range(const char *op, uint64_t off, uint64_t len)
{
    if (off > EXPORT_SIZE || len > EXPORT_SIZE - off) {
        fz_die("E1: %s called outside the export: off=%llu len=%llu size=%u", op,
               (unsigned long long)off, (unsigned long long)len, EXPORT_SIZE);
    }
}

static uint64_t ex_size(void *opaque)
{
    return EXPORT_SIZE;
}

static int ex_pread_locked(void *opaque, void *buf, uint32_t len, uint64_t off)
{
    struct mem_export *x = opaque;
    check_range("pread", off, len);
    if (len > NBD_MAX_REQUEST) {
        fz_die("E1: pread of %u bytes, more than NBD_MAX_REQUEST", len);
    }
    if (off == 7 * BLOCK + 5) {
        return -EIO; /* at one odd offset: error replies for reads */
    }
    memcpy(buf, x->data + off, len);
    if (x->nreads < MAX_READS) {
        x->reads[x->nreads].off = off;
        x->reads[x->nreads].len = len;
        x->reads[x->nreads].hash = fnv(buf, len, 0xcbf29ce484222325ull);
    }
    x->nreads++;
    return 0;
}

/* Blocks entirely inside [off, off+len) take state s; partial ones become data. */
static void set_state(struct mem_export *x, uint64_t off, uint64_t len, int s)
{
    for (uint64_t b = off / BLOCK; len && b * BLOCK < off + len; b++) {
        uint64_t bs = b * BLOCK, be = bs + BLOCK < EXPORT_SIZE ? bs + BLOCK : EXPORT_SIZE;
        bool whole = bs >= off && be <= off + len;
        x->state[b] = whole ? (uint8_t)s : B_DATA;
    }
}

static int ex_pwrite_locked(void *opaque, const void *buf, uint32_t len, uint64_t off, bool fua)
{
    struct mem_export *x = opaque;
    if (x == &ro_exp) {
        fz_die("E1: pwrite on the read-only export");
    }
    check_range("pwrite", off, len);
    if (len > NBD_MAX_REQUEST) {
        fz_die("E1: pwrite of %u bytes, more than NBD_MAX_REQUEST", len);
    }
    memcpy(x->data + off, buf, len);
    set_state(x, off, len, B_DATA);
    return 0;
}

static int ex_flush(void *opaque)
{
    return 0;
}

static int ex_trim_locked(void *opaque, uint32_t len, uint64_t off, bool fua)
{
    struct mem_export *x = opaque;
    if (x == &ro_exp) {
        fz_die("E1: trim on the read-only export");
    }
    check_range("trim", off, len);
    /* Trimmed whole blocks read as zeros; partial blocks keep their data. */
    for (uint64_t b = off / BLOCK; len && b * BLOCK < off + len; b++) {
        uint64_t bs = b * BLOCK, be = bs + BLOCK < EXPORT_SIZE ? bs + BLOCK : EXPORT_SIZE;
        if (bs >= off && be <= off + len) {
            memset(x->data + bs, 0, be - bs);
            x->state[b] = B_HOLE;
        }
    }
    return 0;
}

static int ex_zero_locked(void *opaque, uint32_t len, uint64_t off, bool may_trim, bool fua)
{
    struct mem_export *x = opaque;
    if (x == &ro_exp) {
        fz_die("E1: write_zeroes on the read-only export");
    }
    check_range("zero", off, len);
    if (off == 3 * BLOCK + 1) {
        return -ENOSPC; /* at one odd offset */
    }
    memset(x->data + off, 0, len);
    set_state(x, off, len, may_trim ? B_HOLE : B_ZERO);
    return 0;
}

static int extent(struct mem_export *x, uint64_t off, uint64_t len, struct nbd_extent *out,
                  bool depth)
{
    check_range(depth ? "alloc_depth" : "block_status", off, len);
    if (len == 0) {
        fz_die("E1: block status of an empty range");
    }
    uint64_t b = off / BLOCK, end = off + len;
    int s = x->state[b];
    uint64_t e = (b + 1) * BLOCK;
    while (e < end && x->state[e / BLOCK] == s) {
        e += BLOCK;
    }
    out->len = (e < end ? e : end) - off;
    if (depth) {
        out->flags = s == B_HOLE ? 0 : s == B_BACKING ? 2 : 1;
    } else {
        out->flags = s == B_ZERO   ? NBD_STATE_ZERO
                     : s == B_HOLE ? NBD_STATE_HOLE | NBD_STATE_ZERO
                                   : 0;
    }
    return 0;
}

#define LOCKED(x, call)                                                                            \
    do {                                                                                           \
        pthread_mutex_lock(&(x)->lock);                                                            \
        int r_ = (call);                                                                           \
        pthread_mutex_unlock(&(x)->lock);                                                          \
        return r_;                                                                                 \
    } while (0)

static int ex_pread(void *opaque, void *buf, uint32_t len, uint64_t off)
{
    LOCKED((struct mem_export *)opaque, ex_pread_locked(opaque, buf, len, off));
}

static int ex_pwrite(void *opaque, const void *buf, uint32_t len, uint64_t off, bool fua)
{
    LOCKED((struct mem_export *)opaque, ex_pwrite_locked(opaque, buf, len, off, fua));
}

static int ex_trim(void *opaque, uint32_t len, uint64_t off, bool fua)
{
    LOCKED((struct mem_export *)opaque, ex_trim_locked(opaque, len, off, fua));
}

static int ex_zero(void *opaque, uint32_t len, uint64_t off, bool may_trim, bool fua)
{
    LOCKED((struct mem_export *)opaque, ex_zero_locked(opaque, len, off, may_trim, fua));
}

static int ex_block_status(void *opaque, uint64_t off, uint64_t len, struct nbd_extent *out)
{
    LOCKED((struct mem_export *)opaque, extent(opaque, off, len, out, false));
}

static int ex_alloc_depth(void *opaque, uint64_t off, uint64_t len, struct nbd_extent *out)
{
    LOCKED((struct mem_export *)opaque, extent(opaque, off, len, out, true));
}

static const struct nbd_export_ops mem_ops = {
    .size = ex_size,
    .pread = ex_pread,
    .pwrite = ex_pwrite,
    .flush = ex_flush,
    .trim = ex_trim,
    .zero = ex_zero,
    .block_status = ex_block_status,
    .alloc_depth = ex_alloc_depth,
};

static struct nbd_export exports_tab[] = {
    {.name = "disk", .writable = true, .multi_conn = true, .ops = &mem_ops, .opaque = &rw_exp},
    {.name = "ro", .description = "read-only in-memory disk", .ops = &mem_ops, .opaque = &ro_exp},
};

static struct nbd_export *exports_find(void *opaque, const char *name)
{
    struct nbd_export *e = NULL;
    if (!*name || !strcmp(name, "disk")) {
        e = &exports_tab[0];
    } else if (!strcmp(name, "ro")) {
        e = &exports_tab[1];
    }
    refs += e != NULL;
    return e;
}

static void exports_release(void *opaque, struct nbd_export *e)
{
    if (refs-- <= 0) {
        fz_die("E1: an export released more often than found");
    }
}

static void exports_list(void *opaque, void (*fn)(void *arg, const struct nbd_export *e), void *arg)
{
    for (size_t i = 0; i < 2; i++) {
        fn(arg, &exports_tab[i]);
    }
}

static const struct nbd_exports exports = {
    .find = exports_find,
    .release = exports_release,
    .list = exports_list,
};

/* The same exports served by 4 workers per connection: replies in completion order. */
static const struct nbd_exports exports_threaded = {
    .find = exports_find,
    .release = exports_release,
    .list = exports_list,
    .threads = 4,
};

static uint8_t *tmpl_data, tmpl_state[NBLOCKS];

static void reset_export(struct mem_export *x)
{
    memcpy(x->data, tmpl_data, EXPORT_SIZE);
    memcpy(x->state, tmpl_state, NBLOCKS);
    x->nreads = 0;
}

static void make_template(struct mem_export *x)
{
    for (uint32_t b = 0; b < NBLOCKS; b++) {
        uint64_t bs = (uint64_t)b * BLOCK, n = bs + BLOCK < EXPORT_SIZE ? BLOCK : EXPORT_SIZE - bs;
        int s = b < 8 ? B_DATA : b < 16 ? B_ZERO : b < 40 ? B_HOLE : b % 3 ? B_BACKING : B_DATA;
        x->state[b] = (uint8_t)s;
        if (s == B_DATA || s == B_BACKING) {
            for (uint64_t i = 0; i < n; i++) {
                x->data[bs + i] = (uint8_t)(b * 7 + i * 13 + (s == B_BACKING));
            }
        } else {
            memset(x->data + bs, 0, n);
        }
    }
    x->nreads = 0;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    fz_verbose = getenv("FUZZ_VERBOSE") != NULL;
    pthread_mutex_init(&rw_exp.lock, NULL);
    pthread_mutex_init(&ro_exp.lock, NULL);
    rw_exp.data = malloc(EXPORT_SIZE);
    ro_exp.data = malloc(EXPORT_SIZE);
    tmpl_data = malloc(EXPORT_SIZE);
    if (!rw_exp.data || !ro_exp.data || !tmpl_data) {
        fz_die("out of memory");
    }
    make_template(&rw_exp);
    memcpy(tmpl_data, rw_exp.data, EXPORT_SIZE);
    memcpy(tmpl_state, rw_exp.state, NBLOCKS);
    return 0;
}

static int serve_result;

static void serve(int fd, void *opaque)
{
    serve_result = nbd_serve(fd, opaque);
}

/* ---- the lockstep model ---- */

struct stream {
    const uint8_t *p;
    size_t len, pos;
};

static bool avail(const struct stream *s, size_t n)
{
    return s->len - s->pos >= n;
}

static const uint8_t *take(struct stream *s, size_t n)
{
    const uint8_t *p = s->p + s->pos;
    s->pos += n;
    return p;
}

struct model {
    struct stream in, out;
    bool structured;
    bool ctx[3];      /* negotiated meta context ids (1 base:allocation, 2 depth) */
    int set_ctx;      /* ids announced by the SET_META_CONTEXT being answered */
    unsigned read;    /* successful reads answered so far */
    unsigned replies; /* requests whose replies were checked */
    bool unordered;   /* threaded server: replies in completion order */
    struct mem_export *exp;
};

/* The server has nothing more to say: it closed (or will) after what was already checked. */
static void expect_end(struct model *m, const char *why)
{
    if (m->out.pos != m->out.len) {
        fz_die("E3: %zu reply bytes after %s (at reply offset %zu)", m->out.len - m->out.pos, why,
               m->out.pos);
    }
}

/* Option replies for option opt; returns 1 when transmission starts (GO acknowledged), 0 when
 * negotiation goes on, -1 when the reply stream ends. */
static int option_replies(struct model *m, uint32_t opt)
{
    bool set = opt == NBD_OPT_SET_META_CONTEXT;
    bool ids[3] = {false, false, false};
    for (;;) {
        if (!avail(&m->out, 20)) {
            return -1;
        }
        const uint8_t *h = take(&m->out, 20);
        if (ld_be64(h) != NBD_REP_MAGIC) {
            fz_die("E2: option reply without its magic at reply offset %zu", m->out.pos - 20);
        }
        uint32_t ropt = ld_be32(h + 8), type = ld_be32(h + 12), len = ld_be32(h + 16);
        if (ropt != opt) {
            fz_die("E2: reply for option %u while option %u was asked", ropt, opt);
        }
        if (!avail(&m->out, len)) {
            return -1;
        }
        const uint8_t *d = take(&m->out, len);
        if (type == NBD_REP_META_CONTEXT) {
            if (len < 5) {
                fz_die("E2: META_CONTEXT reply of %u bytes", len);
            }
            uint32_t id = ld_be32(d);
            if (id != 1 && id != 2) {
                fz_die("E2: unknown meta context id %u", id);
            }
            ids[id] = true;
        }
        if (type == NBD_REP_ACK) {
            if (len != 0) {
                fz_die("E2: ACK with %u bytes of data", len);
            }
            if (set) {
                m->ctx[1] = ids[1];
                m->ctx[2] = ids[2];
            }
            if (opt == NBD_OPT_STRUCTURED_REPLY) {
                m->structured = true;
            }
            return opt == NBD_OPT_GO ? 1 : 0;
        }
        if (type & 0x80000000u) {
            return 0;
        }
    }
}

/* Returns true when transmission starts. */
static bool negotiate(struct model *m)
{
    if (!avail(&m->out, 18)) {
        return false;
    }
    const uint8_t *h = take(&m->out, 18);
    if (ld_be64(h) != NBD_MAGIC || ld_be64(h + 8) != NBD_OPTS_MAGIC) {
        fz_die("E2: bad greeting");
    }
    if (!avail(&m->in, 4)) {
        return false;
    }
    uint32_t cflags = ld_be32(take(&m->in, 4));
    if (cflags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) {
        expect_end(m, "unknown client flags");
        return false;
    }
    bool no_zeroes = cflags & NBD_FLAG_C_NO_ZEROES;
    for (;;) {
        if (!avail(&m->in, 16)) {
            return false;
        }
        const uint8_t *o = take(&m->in, 16);
        if (ld_be64(o) != NBD_OPTS_MAGIC) {
            expect_end(m, "an option without its magic");
            return false;
        }
        uint32_t opt = ld_be32(o + 8), len = ld_be32(o + 12);
        if (!avail(&m->in, len)) {
            return false;
        }
        m->in.pos += len;
        if (opt == NBD_OPT_EXPORT_NAME && len <= (64u << 10)) {
            if (m->out.pos == m->out.len) {
                return false; /* unknown export: the server hangs up */
            }
            size_t n = no_zeroes ? 10 : 134;
            if (!avail(&m->out, n)) {
                return false;
            }
            const uint8_t *r = take(&m->out, n);
            if (ld_be64(r) != EXPORT_SIZE) {
                fz_die("E2: EXPORT_NAME reply with size %llu", (unsigned long long)ld_be64(r));
            }
            const char *name = (const char *)(m->in.p + m->in.pos - len);
            m->exp = len == 2 && !memcmp(name, "ro", 2) ? &ro_exp : &rw_exp;
            return true;
        }
        int r = option_replies(m, opt);
        if (r < 0) {
            return false;
        }
        if (opt == NBD_OPT_ABORT && len <= (64u << 10)) {
            expect_end(m, "NBD_OPT_ABORT");
            return false;
        }
        if (r == 1) {
            /* Which export: GO's name is a u32 length then the name. */
            const uint8_t *d = m->in.p + m->in.pos - len;
            uint32_t n = ld_be32(d);
            m->exp = n == 2 && !memcmp(d + 4, "ro", 2) ? &ro_exp : &rw_exp;
            return true;
        }
    }
}

static void check_read_data(struct model *m, uint64_t off, const uint8_t *data, uint32_t len)
{
    if (m->unordered) {
        /* Reads complete in any order: the data must be what one of them returned. */
        m->read++;
        if (m->exp->nreads > MAX_READS) {
            return;
        }
        uint64_t h = fnv(data, len, 0xcbf29ce484222325ull);
        for (unsigned i = 0; i < m->exp->nreads; i++) {
            if (m->exp->reads[i].off == off && m->exp->reads[i].len == len &&
                m->exp->reads[i].hash == h) {
                return;
            }
        }
        fz_die("E2: read reply (off %llu, %u bytes) matches no read of the export",
               (unsigned long long)off, len);
    }
    unsigned k = m->read++;
    if (k >= MAX_READS || k >= m->exp->nreads) {
        if (k >= m->exp->nreads) {
            fz_die("E2: a read reply with no read behind it");
        }
        return;
    }
    if (m->exp->reads[k].off != off || m->exp->reads[k].len != len ||
        m->exp->reads[k].hash != fnv(data, len, 0xcbf29ce484222325ull)) {
        fz_die("E2: read reply %u (off %llu, %u bytes) differs from what the export returned", k,
               (unsigned long long)off, len);
    }
}

/* One structured reply series for a request; false when the reply stream ends. */
static bool structured_reply(struct model *m, uint64_t cookie, uint16_t type, uint16_t flags,
                             uint64_t off, uint32_t len)
{
    bool block_status = type == NBD_CMD_BLOCK_STATUS;
    uint64_t bs_total[3] = {0, 0, 0};
    bool read_ok = true;
    uint64_t data_seen = 0;
    for (;;) {
        if (!avail(&m->out, 20)) {
            return false;
        }
        const uint8_t *h = take(&m->out, 20);
        if (ld_be32(h) != NBD_STRUCTURED_REPLY_MAGIC) {
            fz_die("E2: structured reply without its magic at reply offset %zu", m->out.pos - 20);
        }
        uint16_t cflags = ld_be16(h + 4), ctype = ld_be16(h + 6);
        uint64_t ccookie = ld_be64(h + 8);
        uint32_t clen = ld_be32(h + 16);
        if (ccookie != cookie) {
            fz_die("E2: reply with cookie %#llx for the request with cookie %#llx",
                   (unsigned long long)ccookie, (unsigned long long)cookie);
        }
        if (!avail(&m->out, clen)) {
            return false;
        }
        const uint8_t *d = take(&m->out, clen);
        switch (ctype) {
        case NBD_REPLY_TYPE_NONE:
            if (clen != 0 || !(cflags & NBD_REPLY_FLAG_DONE)) {
                fz_die("E2: NONE chunk with %u bytes or without DONE", clen);
            }
            break;
        case NBD_REPLY_TYPE_OFFSET_DATA: {
            if (type != NBD_CMD_READ || clen < 8) {
                fz_die("E2: OFFSET_DATA chunk for command %u (%u bytes)", type, clen);
            }
            uint64_t o = ld_be64(d);
            if (o < off || clen - 8 > len || o - off > len - (clen - 8)) {
                fz_die("E2: OFFSET_DATA outside the request");
            }
            data_seen += clen - 8;
            check_read_data(m, o, d + 8, clen - 8);
            break;
        }
        case NBD_REPLY_TYPE_BLOCK_STATUS: {
            if (!block_status || clen < 12 || (clen - 4) % 8) {
                fz_die("E2: BLOCK_STATUS chunk for command %u with %u bytes", type, clen);
            }
            uint32_t id = ld_be32(d);
            if (id > 2 || !m->ctx[id]) {
                fz_die("E2: BLOCK_STATUS for context %u, not negotiated", id);
            }
            uint32_t n = (clen - 4) / 8;
            if ((flags & NBD_CMD_FLAG_REQ_ONE) && n != 1) {
                fz_die("E2: %u extents with REQ_ONE", n);
            }
            for (uint32_t i = 0; i < n; i++) {
                uint32_t el = ld_be32(d + 4 + 8 * i);
                if (el == 0) {
                    fz_die("E2: empty extent");
                }
                bs_total[id] += el;
            }
            if (bs_total[id] > len) {
                fz_die("E2: extents of %llu bytes for a %u-byte request",
                       (unsigned long long)bs_total[id], len);
            }
            break;
        }
        case NBD_REPLY_TYPE_ERROR:
        case NBD_REPLY_TYPE_ERROR_OFFSET:
            if (clen < 6 || ld_be16(d + 4) > clen - 6 || ld_be32(d) == 0) {
                fz_die("E2: malformed error chunk");
            }
            read_ok = false;
            break;
        default:
            fz_die("E2: unknown chunk type %u", ctype);
        }
        if (cflags & NBD_REPLY_FLAG_DONE) {
            break;
        }
    }
    if (type == NBD_CMD_READ && read_ok && data_seen != len) {
        fz_die("E2: a successful read of %u bytes answered with %llu", len,
               (unsigned long long)data_seen);
    }
    return true;
}

static void transmission(struct model *m)
{
    for (;;) {
        if (!avail(&m->in, 28)) {
            return;
        }
        const uint8_t *h = take(&m->in, 28);
        if (ld_be32(h) != NBD_REQUEST_MAGIC) {
            expect_end(m, "a request without its magic");
            return;
        }
        uint16_t flags = ld_be16(h + 4), type = ld_be16(h + 6);
        uint64_t cookie = ld_be64(h + 8), off = ld_be64(h + 16);
        uint32_t len = ld_be32(h + 24);
        if (type == NBD_CMD_DISC) {
            expect_end(m, "NBD_CMD_DISC");
            return;
        }
        bool oversized = (type == NBD_CMD_READ || type == NBD_CMD_WRITE) && len > NBD_MAX_REQUEST;
        if (type == NBD_CMD_WRITE && !oversized) {
            if (!avail(&m->in, len)) {
                return;
            }
            m->in.pos += len;
        }
        if (!m->structured || (oversized && type == NBD_CMD_WRITE)) {
            if (!avail(&m->out, 16)) {
                return;
            }
            const uint8_t *r = take(&m->out, 16);
            if (m->structured && ld_be32(r) == NBD_STRUCTURED_REPLY_MAGIC) {
                /* The oversized write's error, then the server hangs up. */
                m->out.pos -= 16;
                if (!structured_reply(m, cookie, type, flags, off, len)) {
                    return;
                }
                expect_end(m, "an oversized write");
                return;
            }
            if (ld_be32(r) != NBD_SIMPLE_REPLY_MAGIC) {
                fz_die("E2: simple reply without its magic at reply offset %zu", m->out.pos - 16);
            }
            if (ld_be64(r + 8) != cookie) {
                fz_die("E2: reply with cookie %#llx for the request with cookie %#llx",
                       (unsigned long long)ld_be64(r + 8), (unsigned long long)cookie);
            }
            uint32_t err = ld_be32(r + 4);
            if (type == NBD_CMD_READ && err == 0) {
                if (!avail(&m->out, len)) {
                    return;
                }
                check_read_data(m, off, take(&m->out, len), len);
            }
            if (oversized && type == NBD_CMD_WRITE) {
                if (err == 0) {
                    fz_die("E2: an oversized write reported success");
                }
                expect_end(m, "an oversized write");
                return;
            }
            m->replies++;
            continue;
        }
        if (!structured_reply(m, cookie, type, flags, off, len)) {
            return;
        }
        m->replies++;
    }
}

/* ---- the model of the threaded server: replies matched by cookie ---- */

struct pending {
    uint64_t cookie, off;
    uint32_t len;
    uint16_t type, flags;
    bool done;
};

static void transmission_unordered(struct model *m)
{
    static struct pending q[8192];
    size_t nq = 0;
    bool clean = true; /* the server ends on EOF or DISC: every request gets its reply */
    while (nq < sizeof(q) / sizeof(q[0]) && avail(&m->in, 28)) {
        const uint8_t *h = take(&m->in, 28);
        if (ld_be32(h) != NBD_REQUEST_MAGIC) {
            clean = false; /* protocol error: the socket is shut down, replies may be lost */
            break;
        }
        struct pending p = {.flags = ld_be16(h + 4),
                            .type = ld_be16(h + 6),
                            .cookie = ld_be64(h + 8),
                            .off = ld_be64(h + 16),
                            .len = ld_be32(h + 24)};
        if (p.type == NBD_CMD_DISC) {
            break;
        }
        if (p.type == NBD_CMD_WRITE && p.len > NBD_MAX_REQUEST) {
            q[nq++] = p;
            clean = false;
            break;
        }
        if (p.type == NBD_CMD_WRITE) {
            if (!avail(&m->in, p.len)) {
                break; /* EOF inside the payload: the request is not executed */
            }
            m->in.pos += p.len;
        }
        for (size_t i = 0; i < nq; i++) {
            if (q[i].cookie == p.cookie) {
                return; /* duplicate cookies in flight: replies cannot be told apart */
            }
        }
        q[nq++] = p;
    }
    if (nq == sizeof(q) / sizeof(q[0])) {
        return;
    }
    while (m->out.pos < m->out.len) {
        bool sr = m->structured;
        size_t hl = sr ? 20 : 16;
        if (!avail(&m->out, hl)) {
            if (clean) {
                fz_die("E2: a truncated reply at reply offset %zu", m->out.pos);
            }
            return;
        }
        const uint8_t *h = m->out.p + m->out.pos;
        uint32_t magic = ld_be32(h);
        if (magic != (sr ? NBD_STRUCTURED_REPLY_MAGIC : NBD_SIMPLE_REPLY_MAGIC)) {
            fz_die("E2: %s reply without its magic at reply offset %zu",
                   sr ? "structured" : "simple", m->out.pos);
        }
        uint64_t cookie = ld_be64(h + 8);
        struct pending *p = NULL;
        for (size_t i = 0; i < nq && !p; i++) {
            if (q[i].cookie == cookie && !q[i].done) {
                p = &q[i];
            }
        }
        if (!p) {
            fz_die("E2: a reply with cookie %#llx, which no unanswered request carries",
                   (unsigned long long)cookie);
        }
        if (sr) {
            if (!structured_reply(m, cookie, p->type, p->flags, p->off, p->len)) {
                if (clean) {
                    fz_die("E2: a truncated reply for cookie %#llx", (unsigned long long)cookie);
                }
                return;
            }
        } else {
            m->out.pos += 16;
            uint32_t err = ld_be32(h + 4);
            if (p->type == NBD_CMD_READ && err == 0) {
                if (!avail(&m->out, p->len)) {
                    if (clean) {
                        fz_die("E2: a truncated read reply for cookie %#llx",
                               (unsigned long long)cookie);
                    }
                    return;
                }
                check_read_data(m, p->off, take(&m->out, p->len), p->len);
            }
        }
        p->done = true;
        m->replies++;
    }
    for (size_t i = 0; clean && i < nq; i++) {
        if (!q[i].done) {
            fz_die("E2: request %zu (command %u, cookie %#llx) was never answered", i, q[i].type,
                   (unsigned long long)q[i].cookie);
        }
    }
}

/* One session against the ordered (threads = 0) or the threaded server. */
static void run_session(const uint8_t *data, size_t size, bool threaded)
{
    reset_export(&rw_exp);
    reset_export(&ro_exp);
    refs = 0;
    struct fz_peer_out out;
    fz_peer_run(data, size, serve, (void *)(threaded ? &exports_threaded : &exports), MAX_KEEP,
                &out);
    if (refs != 0) {
        fz_die("E1: %d export reference(s) not released", refs);
    }
    unsigned checked = 0, reads = 0;
    if (out.total <= out.len) {
        struct model m = {
            .in = {data, size, 0}, .out = {out.buf, out.len, 0}, .unordered = threaded};
        if (negotiate(&m)) {
            if (threaded) {
                transmission_unordered(&m);
            } else {
                transmission(&m);
            }
        }
        checked = m.replies;
        reads = m.read;
    }
    fz_log("nbd_serve (%s): %d, %zu reply bytes, %u replies checked (%u reads)",
           threaded ? "4 workers" : "ordered", serve_result, out.total, checked, reads);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    run_session(data, size, false);
    run_session(data, size, true);
    return 0;
}
