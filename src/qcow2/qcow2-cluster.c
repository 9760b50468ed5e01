/*
 * Guest → host mapping: L1/L2 lookup, reads through the chain, allocating writes with
 * copy-on-write, zero writes, discard and block status.
 *
 * The allocation unit is the subcluster with extended L2 entries, the cluster otherwise.
 * A write to a unit this image owns exclusively (COPIED, allocated, not compressed) goes in
 * place with no metadata change. Anything else gets a new host cluster: the guest-visible
 * content of the cluster is read (through the backing chain where needed), overlaid with the
 * new bytes, written, and only then is the L2 entry changed (Q1); the old host cluster is
 * released through the pending-free list (Q4).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2/qcow2.h"
#include "util/bswap.h"
#include "util/err.h"
#include "util/misc.h"

static inline uint64_t l1_index(const struct qcow2_state *q, uint64_t off)
{
    return (off >> q->cluster_bits) / q->l2_entries;
}

static inline uint64_t l2_index(const struct qcow2_state *q, uint64_t off)
{
    return (off >> q->cluster_bits) & (q->l2_entries - 1);
}

static inline uint64_t l2_get(const struct qcow2_state *q, const uint8_t *t, uint64_t i)
{
    return ld_be64(t + i * q->l2_entry_bytes);
}

static inline uint64_t l2_get_bitmap(const struct qcow2_state *q, const uint8_t *t, uint64_t i)
{
    return q->ext_l2 ? ld_be64(t + i * q->l2_entry_bytes + 8) : 0;
}

static void l2_set(struct qcow2_state *q, struct qcow2_cache_entry *e, uint64_t i, uint64_t entry,
                   uint64_t bitmap)
{
    st_be64(e->table + i * q->l2_entry_bytes, entry);
    if (q->ext_l2) {
        st_be64(e->table + i * q->l2_entry_bytes + 8, bitmap);
    }
    qcow2_cache_mark_dirty(&q->l2_cache, e);
}

static uint64_t file_end(struct qcow2_state *q)
{
    return q->host_end;
}

void qcow2_compressed_range(struct qcow2_state *q, uint64_t l2e, uint64_t *off, uint64_t *len)
{
    uint64_t coff = l2e & q->coffset_mask;
    uint64_t nsect = ((l2e >> q->csize_shift) & q->csize_mask) + 1;
    *off = coff & ~511ull;
    *len = nsect * 512;
}

/* Host storage an L2 entry owns (to release when the entry is replaced), or len 0. */
static void entry_storage(struct qcow2_state *q, uint64_t l2e, uint64_t *off, uint64_t *len)
{
    *len = 0;
    if (l2e & QCOW2_OFLAG_COMPRESSED) {
        qcow2_compressed_range(q, l2e, off, len);
        return;
    }
    uint64_t host = l2e & QCOW2_L2E_OFFSET_MASK;
    if (host) {
        *off = host;
        *len = q->cluster_size;
    }
}

/* Borrow the L2 table covering off for reading; *e = NULL when the L1 entry is empty. */
static int l2_table_read(struct qcow2_state *q, uint64_t off, struct qcow2_cache_entry **e)
{
    *e = NULL;
    uint64_t i = l1_index(q, off);
    if (i >= q->l1_size) {
        return 0;
    }
    uint64_t l1e = q->l1[i];
    if (l1e & QCOW2_L1E_RESERVED_MASK) {
        return qcow2_corrupt(q, "L1 entry %llu has reserved bits set (0x%llx)",
                             (unsigned long long)i, (unsigned long long)l1e);
    }
    uint64_t l2off = l1e & QCOW2_L1E_OFFSET_MASK;
    if (!l2off) {
        return 0;
    }
    int role = qcow2_meta_type(q, l2off >> q->cluster_bits);
    if (role && role != QCOW2_META_L2) {
        return qcow2_corrupt(q, "L1 entry %llu points to the %s at 0x%llx instead of an L2 table",
                             (unsigned long long)i, qcow2_meta_name(role),
                             (unsigned long long)l2off);
    }
    if ((l2off & (q->cluster_size - 1)) || l2off >= file_end(q)) {
        return qcow2_corrupt(q,
                             "L2 table offset 0x%llx (L1 index %llu) is unaligned or past the "
                             "end of the file",
                             (unsigned long long)l2off, (unsigned long long)i);
    }
    return qcow2_cache_get(&q->l2_cache, l2off, false, e);
}

/* Decode one allocation unit (cluster, or subcluster sc) of an L2 entry. */
static int decode(struct qcow2_state *q, uint64_t l2e, uint64_t bitmap, unsigned sc,
                  enum qcow2_kind *kind, uint64_t *host)
{
    *host = 0;
    if (l2e & QCOW2_OFLAG_COMPRESSED) {
        *kind = QK_COMPRESSED;
        return 0;
    }
    uint64_t off = l2e & QCOW2_L2E_OFFSET_MASK;
    if (off & (q->cluster_size - 1)) {
        return qcow2_corrupt(q, "L2 entry 0x%llx points to an unaligned cluster",
                             (unsigned long long)l2e);
    }
    if (l2e & (q->ext_l2 ? (QCOW2_L2E_STD_RESERVED_MASK | QCOW2_OFLAG_ZERO)
                         : QCOW2_L2E_STD_RESERVED_MASK)) {
        return qcow2_corrupt(q, "L2 entry 0x%llx has reserved bits set", (unsigned long long)l2e);
    }
    if (!q->ext_l2) {
        if (l2e & QCOW2_OFLAG_ZERO) {
            if (q->version < 3) {
                return qcow2_corrupt(q, "zero cluster entry 0x%llx found in a version 2 image",
                                     (unsigned long long)l2e);
            }
            *kind = QK_ZERO;
        } else if (off == 0) {
            if (l2e & QCOW2_OFLAG_COPIED) {
                return qcow2_corrupt(q, "L2 entry 0x%llx is COPIED but has no offset",
                                     (unsigned long long)l2e);
            }
            *kind = QK_UNALLOC;
        } else {
            *kind = QK_DATA;
            *host = off;
        }
        return 0;
    }
    bool alloc = (bitmap >> sc) & 1, zero = (bitmap >> (32 + sc)) & 1;
    if (alloc && zero) {
        return qcow2_corrupt(q, "subcluster %u is both allocated and zero (bitmap 0x%llx)", sc,
                             (unsigned long long)bitmap);
    }
    if (zero) {
        *kind = QK_ZERO;
    } else if (alloc) {
        if (off == 0) {
            return qcow2_corrupt(q, "allocated subcluster in an L2 entry without an offset");
        }
        *kind = QK_DATA;
        *host = off + sc * q->subcluster_size;
    } else {
        *kind = QK_UNALLOC;
    }
    return 0;
}

int qcow2_get_status(struct qcow2_state *q, uint64_t off, uint64_t len, struct qcow2_status *st)
{
    memset(st, 0, sizeof(*st));
    uint64_t span = q->cluster_size * q->l2_entries;
    uint64_t table_end = ct_align_down(off, span) + span;
    len = CT_MIN(len, table_end - off);
    struct qcow2_cache_entry *e;
    int r = l2_table_read(q, off, &e);
    if (r < 0) {
        return r;
    }
    if (!e) {
        st->kind = QK_UNALLOC;
        st->len = len;
        return 0;
    }
    uint64_t unit = q->subcluster_size;
    uint64_t pos = off;
    uint64_t end = off + len;
    uint64_t expect_host = 0;
    bool first = true;
    while (pos < end) {
        uint64_t idx = l2_index(q, pos);
        uint64_t l2e = l2_get(q, e->table, idx), bm = l2_get_bitmap(q, e->table, idx);
        unsigned sc = (unsigned)((pos & (q->cluster_size - 1)) / unit);
        enum qcow2_kind kind = QK_UNALLOC;
        uint64_t host;
        r = decode(q, l2e, bm, sc, &kind, &host);
        if (r < 0) {
            break;
        }
        /* Compressed clusters are decoded one cluster at a time. */
        uint64_t unit_len = kind == QK_COMPRESSED ? q->cluster_size : unit;
        uint64_t next = ct_align_down(pos, unit_len) + unit_len;
        uint64_t in_unit = CT_MIN(next, end) - pos;
        if (kind == QK_DATA) {
            /* The cluster must start inside the file; the file may end inside it (reads past
             * the end return zeros, as with QEMU). */
            uint64_t cstart = host & ~(q->cluster_size - 1);
            if (cstart >= file_end(q)) {
                r = qcow2_corrupt(q, "data cluster offset 0x%llx is out of range",
                                  (unsigned long long)cstart);
                break;
            }
            host += pos & (unit - 1);
        }
        if (first) {
            st->kind = kind;
            st->host_off = host;
            st->l2_entry = l2e;
            expect_host = host;
            first = false;
        } else if (kind != st->kind || kind == QK_COMPRESSED ||
                   (kind == QK_DATA && host != expect_host)) {
            break;
        }
        expect_host += in_unit;
        pos += in_unit;
        st->len += in_unit;
        if (kind == QK_COMPRESSED) {
            break;
        }
    }
    qcow2_cache_put(&q->l2_cache, e);
    return r < 0 ? r : 0;
}

static int read_compressed(struct qcow2_state *q, uint64_t l2e, uint8_t **out)
{
    if (q->cbuf && q->cbuf_entry == l2e) {
        *out = q->cbuf;
        return 0;
    }
    if (!q->cbuf) {
        q->cbuf = malloc(q->cluster_size);
        q->cin = malloc(q->cluster_size * 2 + 512);
        if (!q->cbuf || !q->cin) {
            return -ENOMEM;
        }
    }
    uint64_t coff = l2e & q->coffset_mask;
    uint64_t nsect = ((l2e >> q->csize_shift) & q->csize_mask) + 1;
    uint64_t clen = nsect * 512 - (coff & 511);
    if (clen > q->cluster_size * 2 + 512) {
        return qcow2_corrupt(q, "compressed cluster descriptor 0x%llx is too long",
                             (unsigned long long)l2e);
    }
    if (coff >= file_end(q)) {
        return qcow2_corrupt(q, "compressed cluster at 0x%llx lies past the end of the file",
                             (unsigned long long)coff);
    }
    int r = ct_file_pread(q->file, q->cin, clen, coff);
    if (r < 0) {
        return r;
    }
    q->cbuf_entry = 0;
    r = qcow2_decompress(q->compression_type, q->cin, clen, q->cbuf, q->cluster_size);
    if (r < 0) {
        return qcow2_corrupt(q, "compressed cluster at 0x%llx does not decompress",
                             (unsigned long long)coff);
    }
    q->cbuf_entry = l2e;
    *out = q->cbuf;
    return 0;
}

/* below: unallocated ranges read from the backing chain (else as zeros). */
static int pread_common(struct qcow2_state *q, uint8_t *p, uint64_t len, uint64_t off, bool below)
{
    struct ct_image *img = q->img;
    if (img->poison == -CT_E_CORRUPT) {
        return -CT_E_CORRUPT;
    }
    while (len > 0) {
        struct qcow2_status st;
        int r = qcow2_get_status(q, off, len, &st);
        if (r < 0) {
            return r;
        }
        switch (st.kind) {
        case QK_DATA:
            r = ct_file_pread(q->file, p, st.len, st.host_off);
            break;
        case QK_ZERO:
            memset(p, 0, st.len);
            break;
        case QK_UNALLOC:
            if (below) {
                r = image_read_below(img, p, st.len, off);
            } else {
                memset(p, 0, st.len);
            }
            break;
        case QK_COMPRESSED: {
            uint8_t *c = NULL;
            r = read_compressed(q, st.l2_entry, &c);
            if (r == 0) {
                memcpy(p, c + (off & (q->cluster_size - 1)), st.len);
            }
            break;
        }
        }
        if (r < 0) {
            return r;
        }
        p += st.len;
        off += st.len;
        len -= st.len;
    }
    return 0;
}

int qcow2_pread(struct ct_image *img, void *buf, uint64_t len, uint64_t off)
{
    return pread_common(qstate(img), buf, len, off, true);
}

int qcow2_pread_raw(struct qcow2_state *q, void *buf, uint64_t len, uint64_t off)
{
    return pread_common(q, buf, len, off, false);
}

int qcow2_block_status(struct ct_image *img, uint64_t off, uint64_t len, struct ct_extent *out)
{
    struct qcow2_state *q = qstate(img);
    struct qcow2_status st;
    int r = qcow2_get_status(q, off, len, &st);
    if (r < 0) {
        return r;
    }
    out->len = st.len;
    out->host_off = 0;
    switch (st.kind) {
    case QK_UNALLOC:
        out->flags = 0;
        break;
    case QK_ZERO:
        out->flags = CT_STATUS_ALLOCATED | CT_STATUS_ZERO;
        break;
    case QK_DATA:
        out->flags = CT_STATUS_ALLOCATED | CT_STATUS_DATA;
        out->host_off = st.host_off;
        break;
    case QK_COMPRESSED:
        out->flags = CT_STATUS_ALLOCATED | CT_STATUS_DATA | CT_STATUS_COMPRESSED;
        break;
    }
    return 0;
}

/*
 * Borrow the L2 table covering off for writing: allocate it if absent, copy it if shared
 * (its entries' COPIED flags are cleared in the copy: every data cluster it names is now
 * referenced from two tables).
 */
static int l2_table_write(struct qcow2_state *q, uint64_t off, struct qcow2_cache_entry **out)
{
    uint64_t i = l1_index(q, off);
    int r = qcow2_mark_dirty(q);
    if (r < 0) {
        return r;
    }
    if (i >= q->l1_size) {
        r = qcow2_grow_l1(q, (uint32_t)(i + 1));
        if (r < 0) {
            return r;
        }
    }
    uint64_t l1e = q->l1[i];
    uint64_t old = l1e & QCOW2_L1E_OFFSET_MASK;
    if (old && (l1e & QCOW2_OFLAG_COPIED)) {
        return l2_table_read(q, off, out);
    }
    if (old) {
        uint64_t rc;
        r = qcow2_refcount_get(q, old >> q->cluster_bits, &rc);
        if (r < 0) {
            return r;
        }
        if (rc == 1) {
            q->l1[i] = old | QCOW2_OFLAG_COPIED;
            q->l1_dirty_lo = CT_MIN(q->l1_dirty_lo, (uint32_t)i);
            q->l1_dirty_hi = CT_MAX(q->l1_dirty_hi, (uint32_t)i + 1);
            return l2_table_read(q, off, out);
        }
    }
    uint64_t noff;
    r = qcow2_alloc_clusters(q, 1, &noff);
    if (r < 0) {
        return r;
    }
    struct qcow2_cache_entry *e;
    r = qcow2_cache_get(&q->l2_cache, noff, true, &e);
    if (r < 0) {
        return r;
    }
    if (old) {
        struct qcow2_cache_entry *src;
        r = l2_table_read(q, off, &src);
        if (r < 0) {
            qcow2_cache_put(&q->l2_cache, e);
            return r;
        }
        memcpy(e->table, src->table, q->cluster_size);
        qcow2_cache_put(&q->l2_cache, src);
        for (uint64_t k = 0; k < q->l2_entries; k++) {
            uint64_t v = l2_get(q, e->table, k);
            st_be64(e->table + k * q->l2_entry_bytes, v & ~QCOW2_OFLAG_COPIED);
        }
        r = qcow2_free_later(q, old, q->cluster_size);
        if (r < 0) {
            qcow2_cache_put(&q->l2_cache, e);
            return r;
        }
    }
    qcow2_cache_mark_dirty(&q->l2_cache, e);
    r = qcow2_meta_add(q, noff, q->cluster_size, QCOW2_META_L2);
    if (r < 0) {
        qcow2_cache_put(&q->l2_cache, e);
        return r;
    }
    q->l1[i] = noff | QCOW2_OFLAG_COPIED;
    q->l1_dirty_lo = CT_MIN(q->l1_dirty_lo, (uint32_t)i);
    q->l1_dirty_hi = CT_MAX(q->l1_dirty_hi, (uint32_t)i + 1);
    *out = e;
    return 0;
}

/* Bytes from off (up to len, within one L2 table) writable in place, host-contiguous. */
static int inplace_run(struct qcow2_state *q, uint64_t off, uint64_t len, uint64_t *host_out,
                       uint64_t *n_out)
{
    *n_out = 0;
    struct qcow2_cache_entry *e;
    int r = l2_table_read(q, off, &e);
    if (r < 0 || !e) {
        return r;
    }
    uint64_t span = q->cluster_size * q->l2_entries;
    uint64_t end = CT_MIN(off + len, ct_align_down(off, span) + span);
    uint64_t pos = off, expect = 0;
    while (pos < end) {
        uint64_t idx = l2_index(q, pos);
        uint64_t l2e = l2_get(q, e->table, idx);
        uint64_t host = l2e & QCOW2_L2E_OFFSET_MASK;
        if (!(l2e & QCOW2_OFLAG_COPIED) || (l2e & QCOW2_OFLAG_COMPRESSED) || !host ||
            (host & (q->cluster_size - 1)) || (!q->ext_l2 && (l2e & QCOW2_OFLAG_ZERO)) ||
            (l2e & QCOW2_L2E_STD_RESERVED_MASK)) {
            break;
        }
        uint64_t cend = CT_MIN(ct_align_down(pos, q->cluster_size) + q->cluster_size, end);
        if (q->ext_l2) {
            uint64_t bm = l2_get_bitmap(q, e->table, idx);
            unsigned s0 = (unsigned)((pos & (q->cluster_size - 1)) / q->subcluster_size);
            unsigned s1 = (unsigned)(((cend - 1) & (q->cluster_size - 1)) / q->subcluster_size);
            uint64_t need = ((s1 == 31 ? 0xffffffffull : ((1ull << (s1 + 1)) - 1)) >> s0) << s0;
            if ((bm & need) != need) {
                break;
            }
        }
        uint64_t h = host + (pos & (q->cluster_size - 1));
        if (pos != off && h != expect) {
            break;
        }
        if (pos == off) {
            *host_out = h;
        }
        expect = h + (cend - pos);
        pos = cend;
    }
    qcow2_cache_put(&q->l2_cache, e);
    *n_out = pos - off;
    return 0;
}

/* Guest-visible content of the whole cluster containing off (zeros past the virtual end). */
static int read_cluster(struct ct_image *img, uint64_t cstart, uint8_t *buf)
{
    struct qcow2_state *q = qstate(img);
    uint64_t n = img->size > cstart ? CT_MIN(q->cluster_size, img->size - cstart) : 0;
    memset(buf + n, 0, q->cluster_size - n);
    return n ? qcow2_pread(img, buf, n, cstart) : 0;
}

static int write_host(struct qcow2_state *q, const void *buf, uint64_t len, uint64_t host)
{
    int r = qcow2_meta_check_data(q, host, len);
    if (r < 0) {
        return r;
    }
    r = ct_file_pwrite(q->file, buf, len, host);
    if (r == 0) {
        q->unsynced = true;
    }
    return r;
}

/* A cluster allocated for a write that then failed was never referenced: give it back now
 * (no ordering concern, nothing points to it), so a failed write leaks nothing. */
static void unallocate(struct qcow2_state *q, uint64_t host, uint64_t len)
{
    for (uint64_t c = host >> q->cluster_bits; c <= (host + len - 1) >> q->cluster_bits; c++) {
        qcow2_refcount_update(q, c, -1);
    }
}

/*
 * Write [off, off+n) (inside one cluster; buf NULL = zeros) when it cannot go in place:
 * copy-on-write into a new cluster, or fill unallocated subclusters of an owned cluster.
 */
static int write_cow(struct ct_image *img, const uint8_t *buf, uint64_t n, uint64_t off)
{
    struct qcow2_state *q = qstate(img);
    uint64_t cstart = ct_align_down(off, q->cluster_size);
    uint64_t in = off - cstart;
    uint8_t *cbuf = malloc(q->cluster_size);
    if (!cbuf) {
        return -ENOMEM;
    }
    int r = read_cluster(img, cstart, cbuf);
    if (r < 0) {
        goto out;
    }
    if (buf) {
        memcpy(cbuf + in, buf, n);
    } else {
        memset(cbuf + in, 0, n);
    }
    struct qcow2_cache_entry *e;
    r = l2_table_write(q, cstart, &e);
    if (r < 0) {
        goto out;
    }
    uint64_t idx = l2_index(q, cstart);
    uint64_t l2e = l2_get(q, e->table, idx), bm = l2_get_bitmap(q, e->table, idx);
    uint64_t host = l2e & QCOW2_L2E_OFFSET_MASK;
    bool compressed = (l2e & QCOW2_OFLAG_COMPRESSED) != 0;
    uint64_t new_bm = 0;
    if (q->ext_l2) {
        unsigned s0 = (unsigned)(in / q->subcluster_size);
        unsigned s1 = (unsigned)((in + n - 1) / q->subcluster_size);
        uint64_t touched = ((s1 == 31 ? 0xffffffffull : ((1ull << (s1 + 1)) - 1)) >> s0) << s0;
        if (compressed) {
            new_bm = QCOW2_BITMAP_ALLOC_ALL;
        } else {
            uint64_t alloc = (bm & 0xffffffffull) | touched;
            uint64_t zero = (bm >> 32) & ~touched & 0xffffffffull;
            new_bm = alloc | (zero << 32);
        }
        if (host && !compressed && (l2e & QCOW2_OFLAG_COPIED)) {
            /* Owned cluster: fill the touched subclusters in place, then mark them. */
            uint64_t a = (uint64_t)s0 * q->subcluster_size;
            uint64_t b = (uint64_t)(s1 + 1) * q->subcluster_size;
            r = write_host(q, cbuf + a, b - a, host + a);
            if (r == 0) {
                l2_set(q, e, idx, l2e, new_bm);
            }
            qcow2_cache_put(&q->l2_cache, e);
            goto out;
        }
    }
    uint64_t noff;
    r = qcow2_alloc_clusters(q, 1, &noff);
    if (r == 0) {
        r = write_host(q, cbuf, q->cluster_size, noff);
        if (r < 0) {
            unallocate(q, noff, q->cluster_size);
        }
    }
    if (r == 0) {
        uint64_t soff, slen;
        entry_storage(q, l2e, &soff, &slen);
        l2_set(q, e, idx, noff | QCOW2_OFLAG_COPIED, new_bm);
        if (slen) {
            r = qcow2_free_later(q, soff, slen);
        }
    }
    qcow2_cache_put(&q->l2_cache, e);
out:
    free(cbuf);
    return r;
}

/* Whole clusters [off, off + k*cs) (inside one L2 table) to new storage in one write. */
static int write_new_clusters(struct qcow2_state *q, const uint8_t *buf, uint64_t k, uint64_t off,
                              uint64_t *done)
{
    struct qcow2_cache_entry *e;
    int r = l2_table_write(q, off, &e);
    if (r < 0) {
        return r;
    }
    uint64_t noff, got;
    r = qcow2_alloc_clusters_upto(q, k, &noff, &got);
    if (r == 0) {
        r = write_host(q, buf, got << q->cluster_bits, noff);
        if (r < 0) {
            unallocate(q, noff, got << q->cluster_bits);
        }
    }
    if (r == 0) {
        uint64_t idx = l2_index(q, off);
        for (uint64_t i = 0; i < got && r == 0; i++) {
            uint64_t l2e = l2_get(q, e->table, idx + i);
            uint64_t soff, slen;
            entry_storage(q, l2e, &soff, &slen);
            l2_set(q, e, idx + i, (noff + (i << q->cluster_bits)) | QCOW2_OFLAG_COPIED,
                   q->ext_l2 ? QCOW2_BITMAP_ALLOC_ALL : 0);
            if (slen) {
                r = qcow2_free_later(q, soff, slen);
            }
        }
        *done = got << q->cluster_bits;
    }
    qcow2_cache_put(&q->l2_cache, e);
    return r;
}

int qcow2_pwrite(struct ct_image *img, const void *buf, uint64_t len, uint64_t off)
{
    struct qcow2_state *q = qstate(img);
    const uint8_t *p = buf;
    int r;
    /* No dirty bit here: in-place writes change no metadata; allocating paths set it in
     * l2_table_write() and the refcount code before their first change (Q6). */
    uint64_t span = q->cluster_size * q->l2_entries;
    while (len > 0) {
        uint64_t host, n;
        r = inplace_run(q, off, len, &host, &n);
        if (r < 0) {
            return r;
        }
        if (n > 0) {
            r = write_host(q, p, n, host);
        } else if ((off & (q->cluster_size - 1)) == 0 && len >= q->cluster_size) {
            uint64_t k = len >> q->cluster_bits;
            k = CT_MIN(k, (ct_align_down(off, span) + span - off) >> q->cluster_bits);
            /* Stop before the next cluster that can be written in place. */
            for (uint64_t i = 1; i < k; i++) {
                uint64_t h2, n2;
                r = inplace_run(q, off + (i << q->cluster_bits), q->cluster_size, &h2, &n2);
                if (r < 0) {
                    return r;
                }
                if (n2) {
                    k = i;
                    break;
                }
            }
            r = write_new_clusters(q, p, k, off, &n);
        } else {
            n = CT_MIN(len, ct_align_down(off, q->cluster_size) + q->cluster_size - off);
            r = write_cow(img, p, n, off);
        }
        if (r < 0) {
            return r;
        }
        p += n;
        off += n;
        len -= n;
    }
    return 0;
}

static const uint8_t *zero_buffer(struct qcow2_state *q)
{
    if (!q->zeros) {
        q->zeros = calloc(1, q->cluster_size);
    }
    return q->zeros;
}

/* Explicit zero data for [off, off+len) (partial units, and v2 images). */
static int write_zero_data(struct ct_image *img, uint64_t len, uint64_t off)
{
    struct qcow2_state *q = qstate(img);
    const uint8_t *z = zero_buffer(q);
    if (!z) {
        return -ENOMEM;
    }
    while (len > 0) {
        uint64_t n = CT_MIN(len, ct_align_down(off, q->cluster_size) + q->cluster_size - off);
        struct qcow2_status st;
        int r = qcow2_get_status(q, off, n, &st);
        if (r < 0) {
            return r;
        }
        n = st.len;
        bool already_zero =
            st.kind == QK_ZERO || (st.kind == QK_UNALLOC && image_below_is_zero(img, n, off));
        if (!already_zero) {
            r = qcow2_pwrite(img, z, n, off);
            if (r < 0) {
                return r;
            }
        }
        off += n;
        len -= n;
    }
    return 0;
}

/* Set whole clusters/subclusters [off, off+len) (unit-aligned) to read as zero (v3). */
static int zero_units(struct qcow2_state *q, uint64_t len, uint64_t off)
{
    while (len > 0) {
        struct qcow2_cache_entry *e;
        int r = l2_table_write(q, off, &e);
        if (r < 0) {
            return r;
        }
        uint64_t cstart = ct_align_down(off, q->cluster_size);
        uint64_t n = CT_MIN(len, cstart + q->cluster_size - off);
        uint64_t idx = l2_index(q, off);
        uint64_t l2e = l2_get(q, e->table, idx), bm = l2_get_bitmap(q, e->table, idx);
        uint64_t soff = 0, slen = 0, ne, nbm = 0;
        if (!q->ext_l2) {
            entry_storage(q, l2e, &soff, &slen);
            ne = QCOW2_OFLAG_ZERO;
        } else {
            unsigned s0 = (unsigned)((off - cstart) / q->subcluster_size);
            unsigned cnt = (unsigned)(n / q->subcluster_size);
            uint64_t mask = ((cnt == 32 ? 0xffffffffull : ((1ull << cnt) - 1))) << s0;
            if (l2e & QCOW2_OFLAG_COMPRESSED) {
                /* Compressed clusters have no subclusters: expand first. */
                qcow2_cache_put(&q->l2_cache, e);
                r = write_cow(q->img, NULL, n, off);
                if (r < 0) {
                    return r;
                }
                off += n;
                len -= n;
                continue;
            }
            nbm = (bm & ~mask) | (mask << 32);
            ne = l2e;
            if ((nbm & 0xffffffffull) == 0 && (l2e & QCOW2_L2E_OFFSET_MASK)) {
                entry_storage(q, l2e, &soff, &slen);
                ne = 0;
            }
        }
        l2_set(q, e, idx, ne, nbm);
        qcow2_cache_put(&q->l2_cache, e);
        if (slen) {
            r = qcow2_free_later(q, soff, slen);
            if (r < 0) {
                return r;
            }
        }
        off += n;
        len -= n;
    }
    return 0;
}

int qcow2_pwrite_zeroes(struct ct_image *img, uint64_t len, uint64_t off, unsigned flags)
{
    struct qcow2_state *q = qstate(img);
    int r = qcow2_mark_dirty(q);
    if (r < 0) {
        return r;
    }
    if (q->version < 3) {
        return write_zero_data(img, len, off);
    }
    uint64_t unit = q->subcluster_size;
    uint64_t end = off + len;
    uint64_t a = ct_align_up(off, unit);
    /* The last partial unit at the virtual end counts as whole. */
    uint64_t b = end == img->size ? ct_align_up(end, unit) : ct_align_down(end, unit);
    if (a >= b) {
        return write_zero_data(img, len, off);
    }
    if (a > off) {
        r = write_zero_data(img, a - off, off);
    }
    if (r == 0) {
        r = zero_units(q, b - a, a);
    }
    if (r == 0 && b < end) {
        r = write_zero_data(img, end - b, b);
    }
    return r;
}

int qcow2_discard_range(struct qcow2_state *q, uint64_t off, uint64_t len, bool full)
{
    struct ct_image *img = q->img;
    uint64_t end = off + len;
    while (off < end) {
        struct qcow2_cache_entry *e;
        int r = l2_table_read(q, off, &e);
        if (r < 0) {
            return r;
        }
        bool want_zero = !full && img->backing && q->version >= 3;
        uint64_t span = q->cluster_size * q->l2_entries;
        uint64_t tend = CT_MIN(end, ct_align_down(off, span) + span);
        if (!e && !want_zero) {
            off = tend; /* nothing allocated, nothing to hide */
            continue;
        }
        if (e) {
            qcow2_cache_put(&q->l2_cache, e);
        }
        r = l2_table_write(q, off, &e);
        if (r < 0) {
            return r;
        }
        for (; off < tend; off += q->cluster_size) {
            uint64_t idx = l2_index(q, off);
            uint64_t l2e = l2_get(q, e->table, idx), bm = l2_get_bitmap(q, e->table, idx);
            uint64_t soff, slen;
            entry_storage(q, l2e, &soff, &slen);
            uint64_t ne = 0, nbm = 0;
            bool allocated = slen || (l2e & QCOW2_OFLAG_ZERO) || (bm >> 32);
            if (!full && (img->backing || allocated)) {
                if (q->ext_l2) {
                    nbm = QCOW2_BITMAP_ZERO_ALL;
                } else {
                    ne = q->version >= 3 ? QCOW2_OFLAG_ZERO : 0;
                }
            }
            if (ne == l2e && nbm == bm) {
                continue;
            }
            l2_set(q, e, idx, ne, nbm);
            if (slen) {
                r = qcow2_free_later(q, soff, slen);
                if (r < 0) {
                    qcow2_cache_put(&q->l2_cache, e);
                    return r;
                }
            }
        }
        qcow2_cache_put(&q->l2_cache, e);
    }
    return 0;
}

int qcow2_discard(struct ct_image *img, uint64_t len, uint64_t off)
{
    struct qcow2_state *q = qstate(img);
    uint64_t end = off + len;
    uint64_t a = ct_align_up(off, q->cluster_size);
    /* Partial clusters are ignored, except a cluster-aligned tail reaching the image end. */
    uint64_t b =
        end == img->size ? ct_align_up(end, q->cluster_size) : ct_align_down(end, q->cluster_size);
    if (a >= b) {
        return 0;
    }
    if (q->version < 3 && img->backing) {
        /* v2 cannot make a cluster read as zero, and dropping it would expose the backing
         * file's data: QEMU ignores such discards, and so do we (discard is advisory). */
        return 0;
    }
    int r = qcow2_mark_dirty(q);
    return r < 0 ? r : qcow2_discard_range(q, a, b - a, false);
}

int qcow2_preallocate(struct qcow2_state *q, enum ct_prealloc mode)
{
    struct ct_image *img = q->img;
    uint64_t size = ct_align_up(img->size, q->cluster_size);
    uint64_t span = q->cluster_size * q->l2_entries;
    int r = qcow2_mark_dirty(q);
    for (uint64_t off = 0; r == 0 && off < size;) {
        struct qcow2_cache_entry *e;
        r = l2_table_write(q, off, &e);
        if (r < 0) {
            break;
        }
        uint64_t tend = CT_MIN(size, ct_align_down(off, span) + span);
        while (r == 0 && off < tend) {
            uint64_t noff, got;
            r = qcow2_alloc_clusters_upto(q, (tend - off) >> q->cluster_bits, &noff, &got);
            if (r < 0) {
                break;
            }
            uint64_t bytes = got << q->cluster_bits;
            if (mode == CT_PREALLOC_FULL) {
                const uint8_t *z = zero_buffer(q);
                for (uint64_t i = 0; i < got && r == 0; i++) {
                    r = write_host(q, z, q->cluster_size, noff + (i << q->cluster_bits));
                }
            } else if (mode == CT_PREALLOC_FALLOC) {
                r = ct_file_prealloc(q->file, noff, bytes);
            } else {
                /* metadata: the clusters exist in the file (sparse) so nothing points past
                 * its end */
                int64_t fsz = ct_file_size(q->file);
                if (fsz >= 0 && (uint64_t)fsz < noff + bytes) {
                    r = ct_file_truncate(q->file, noff + bytes);
                }
            }
            /* With a backing file (extended L2 only) the subclusters stay unallocated, so
             * reads still fall through; the clusters are reserved for later writes. */
            uint64_t bm = q->ext_l2 && !img->backing_name ? QCOW2_BITMAP_ALLOC_ALL : 0;
            for (uint64_t i = 0; i < got && r == 0; i++) {
                l2_set(q, e, l2_index(q, off) + i,
                       (noff + (i << q->cluster_bits)) | QCOW2_OFLAG_COPIED, bm);
            }
            off += bytes;
        }
        qcow2_cache_put(&q->l2_cache, e);
    }
    if (r == 0) {
        r = qcow2_flush_metadata(q);
    }
    return r;
}

/* Byte-granular allocation for compressed data: consecutive compressed clusters share host
 * clusters; each host cluster touched gets one reference per compressed cluster in it. */
static int alloc_bytes(struct qcow2_state *q, uint64_t len, uint64_t *out)
{
    uint64_t off = q->cfree_off, rc = 0;
    bool share = off && (off & (q->cluster_size - 1)) &&
                 (off & (q->cluster_size - 1)) + len <= q->cluster_size;
    /* Sharing the cluster adds a reference: impossible at the refcount width's maximum
     * (always the case with 1-bit refcounts). */
    if (share && (qcow2_meta_type(q, off >> q->cluster_bits) ||
                  qcow2_refcount_get(q, off >> q->cluster_bits, &rc) < 0 || rc == 0 ||
                  rc >= q->refcount_max)) {
        share = false;
    }
    if (share) {
        int r = qcow2_refcount_update(q, off >> q->cluster_bits, 1);
        if (r < 0) {
            return r;
        }
    } else {
        uint64_t n = ct_div_round_up(len, q->cluster_size);
        int r = qcow2_alloc_clusters(q, n, &off);
        if (r < 0) {
            return r;
        }
    }
    *out = off;
    q->cfree_off = off + len;
    return 0;
}

int qcow2_pwrite_compressed(struct qcow2_state *q, const uint8_t *buf, uint64_t off)
{
    struct ct_image *img = q->img;
    int r = qcow2_mark_dirty(q);
    if (r < 0) {
        return r;
    }
    uint64_t cap = q->cluster_size - 512; /* must save at least a sector to be worth it */
    uint8_t *out = malloc(q->cluster_size);
    if (!out) {
        return -ENOMEM;
    }
    size_t clen = 0;
    r = qcow2_compress(q->compression_type, buf, q->cluster_size, out, cap, &clen);
    if (r == -ENOSPC) {
        free(out);
        return qcow2_pwrite(img, buf, CT_MIN(q->cluster_size, img->size - off), off);
    }
    uint64_t host = 0;
    if (r == 0) {
        r = alloc_bytes(q, clen, &host);
        if (r == 0) {
            r = write_host(q, out, clen, host);
            if (r < 0) {
                unallocate(q, host, clen);
                q->cfree_off = 0;
            }
        }
    }
    free(out);
    if (r < 0) {
        return r;
    }
    struct qcow2_cache_entry *e;
    r = l2_table_write(q, off, &e);
    if (r < 0) {
        return r;
    }
    uint64_t idx = l2_index(q, off);
    uint64_t old = l2_get(q, e->table, idx), soff, slen;
    entry_storage(q, old, &soff, &slen);
    uint64_t nsect = ((host + clen + 511) >> 9) - (host >> 9) - 1;
    uint64_t desc = QCOW2_OFLAG_COMPRESSED | (nsect << q->csize_shift) | host;
    l2_set(q, e, idx, desc, 0);
    qcow2_cache_put(&q->l2_cache, e);
    q->cbuf_entry = 0;
    return slen ? qcow2_free_later(q, soff, slen) : 0;
}
