/*
 * Compaction: give free space back to the filesystem. qcow2 files never shrink under QEMU;
 * after snapshots are deleted or data discarded they keep their high-water mark.
 *
 * 1. Move clusters from the end of the file into free clusters nearer the start, highest
 *    first, while the highest used cluster is movable: data clusters and L2 tables that only
 *    the active state references (refcount 1). Each move follows the allocation rules
 *    (Q1-Q4): the copy is written, then the reference is switched (L2 entry, or L1 entry for
 *    an L2 table) through the normal flush ordering, then the old cluster is released. A crash
 *    at any point leaves either the old or the new reference, and a leaked cluster at worst.
 * 2. Truncate the file after the highest cluster still in use.
 * 3. Punch holes for the free clusters left below that point.
 * Clusters shared with snapshots, compressed data and the fixed metadata structures are not
 * moved, so every snapshot's content is untouched.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2/qcow2.h"
#include "util/bswap.h"
#include "util/err.h"
#include "util/misc.h"

/* Who references a movable cluster: an L1 entry (L2 table) or an L2 entry (data). */
struct owner {
    uint64_t cluster;
    uint64_t l2_off; /* 0: it is an L2 table named by l1 index `index` */
    uint64_t index;
};

static int cmp_owner_desc(const void *a, const void *b)
{
    const struct owner *x = a, *y = b;
    return x->cluster < y->cluster ? 1 : x->cluster > y->cluster ? -1 : 0;
}

static int collect(struct qcow2_state *q, struct owner **out, size_t *n_out)
{
    size_t n = 0, cap = 1024;
    struct owner *v = malloc(cap * sizeof(*v));
    if (!v) {
        return -ENOMEM;
    }
    int r = 0;
    for (uint32_t i = 0; r == 0 && i < q->l1_size; i++) {
        uint64_t l2off = q->l1[i] & QCOW2_L1E_OFFSET_MASK;
        uint64_t rc;
        if (!l2off || qcow2_refcount_get(q, l2off >> q->cluster_bits, &rc) < 0 || rc != 1) {
            continue;
        }
        struct qcow2_cache_entry *e;
        r = qcow2_cache_get(&q->l2_cache, l2off, false, &e);
        if (r < 0) {
            break;
        }
        for (uint64_t j = 0; j <= q->l2_entries && r == 0; j++) {
            uint64_t c, l2e = 0;
            if (j == q->l2_entries) {
                c = l2off >> q->cluster_bits; /* the table itself */
            } else {
                l2e = ld_be64(e->table + j * q->l2_entry_bytes);
                uint64_t host = l2e & QCOW2_L2E_OFFSET_MASK;
                if ((l2e & QCOW2_OFLAG_COMPRESSED) || !host || !(l2e & QCOW2_OFLAG_COPIED)) {
                    continue;
                }
                c = host >> q->cluster_bits;
            }
            if (n == cap) {
                struct owner *nv = realloc(v, cap * 2 * sizeof(*v));
                if (!nv) {
                    r = -ENOMEM;
                    break;
                }
                v = nv;
                cap *= 2;
            }
            v[n].cluster = c;
            v[n].l2_off = j == q->l2_entries ? 0 : l2off;
            v[n].index = j == q->l2_entries ? i : j;
            n++;
        }
        qcow2_cache_put(&q->l2_cache, e);
    }
    if (r < 0) {
        free(v);
        return r;
    }
    qsort(v, n, sizeof(*v), cmp_owner_desc);
    *out = v;
    *n_out = n;
    return 0;
}

/* Highest cluster with a non-zero refcount, +1. */
static int used_end(struct qcow2_state *q, uint64_t *end)
{
    /* A file may end inside its last cluster (compressed data, short writes): count it. */
    uint64_t c = ct_div_round_up(q->host_end, q->cluster_size);
    while (c > 1) {
        uint64_t rc;
        int r = qcow2_refcount_get(q, c - 1, &rc);
        if (r < 0) {
            return r;
        }
        if (rc) {
            break;
        }
        c--;
    }
    *end = c;
    return 0;
}

static int move_one(struct qcow2_state *q, const struct owner *o, uint64_t dst, uint8_t *buf)
{
    uint64_t src_off = o->cluster << q->cluster_bits, dst_off = dst << q->cluster_bits;
    int r;
    if (o->l2_off == 0) {
        /* An L2 table: make sure the cache holds no newer copy, then copy it. */
        r = qcow2_cache_flush(&q->l2_cache);
        if (r < 0) {
            return r;
        }
        qcow2_cache_discard(&q->l2_cache, src_off);
    }
    r = ct_file_pread(q->file, buf, q->cluster_size, src_off);
    if (r == 0) {
        r = ct_file_pwrite(q->file, buf, q->cluster_size, dst_off);
        q->unsynced = true;
    }
    if (r < 0) {
        return r;
    }
    if (o->l2_off == 0) {
        r = qcow2_meta_add(q, dst_off, q->cluster_size, QCOW2_META_L2);
        if (r < 0) {
            return r;
        }
        /* Q3: the L1 entry is written by flush_metadata after a barrier. */
        q->l1[o->index] = dst_off | QCOW2_OFLAG_COPIED;
        q->l1_dirty_lo = CT_MIN(q->l1_dirty_lo, (uint32_t)o->index);
        q->l1_dirty_hi = CT_MAX(q->l1_dirty_hi, (uint32_t)o->index + 1);
    } else {
        struct qcow2_cache_entry *e;
        r = qcow2_cache_get(&q->l2_cache, o->l2_off, false, &e);
        if (r < 0) {
            return r;
        }
        uint8_t *ep = e->table + o->index * q->l2_entry_bytes;
        uint64_t l2e = ld_be64(ep);
        st_be64(ep, (l2e & ~QCOW2_L2E_OFFSET_MASK) | dst_off);
        e->dirty = true;
        qcow2_cache_put(&q->l2_cache, e);
    }
    return qcow2_free_later(q, src_off, q->cluster_size);
}

static int compact(struct qcow2_state *q, uint64_t *moved, uint64_t *new_end)
{
    int r = qcow2_mark_dirty(q);
    if (r == 0) {
        r = qcow2_flush_metadata(q);
    }
    if (r < 0) {
        return r;
    }
    *moved = 0;
    struct owner *v = NULL;
    size_t n = 0;
    r = collect(q, &v, &n);
    uint8_t *buf = malloc(q->cluster_size);
    if (r == 0 && !buf) {
        r = -ENOMEM;
    }
    uint64_t end = 0;
    if (r == 0) {
        r = used_end(q, &end);
    }
    size_t k = 0;
    /* Moving an L2 table invalidates the owner records of its entries: move data first by
     * handling clusters strictly from the top and re-collecting after each L2 table move. */
    while (r == 0 && k < n && v[k].cluster + 1 == end) {
        q->free_hint = 1;
        uint64_t dst;
        r = qcow2_alloc_clusters(q, 1, &dst);
        if (r < 0) {
            break;
        }
        dst >>= q->cluster_bits;
        if (dst >= v[k].cluster) {
            /* No free cluster below: undo the allocation through the normal free path. */
            r = qcow2_free_later(q, dst << q->cluster_bits, q->cluster_size);
            break;
        }
        r = move_one(q, &v[k], dst, buf);
        (*moved)++;
        bool table = v[k].l2_off == 0;
        uint64_t from = v[k].cluster;
        k++;
        if (r == 0 && ((*moved) % 512 == 0 || table)) {
            r = qcow2_flush_metadata(q);
        }
        /* The new top: the highest cluster below the one just moved that is still in use
         * (moved clusters above it keep their refcount until the batch is flushed). */
        for (end = from; r == 0 && end > 1; end--) {
            uint64_t rc;
            r = qcow2_refcount_get(q, end - 1, &rc);
            if (rc) {
                break;
            }
        }
        if (r == 0 && table) {
            free(v);
            v = NULL;
            r = collect(q, &v, &n);
            k = 0;
            while (k < n && v[k].cluster >= end) {
                k++;
            }
        }
    }
    free(v);
    free(buf);
    if (r == 0) {
        r = qcow2_flush_metadata(q);
    }
    if (r == 0) {
        r = used_end(q, &end);
    }
    if (r < 0) {
        return r;
    }
    /* Everything past `end` has refcount 0 and nothing points at it. */
    r = ct_file_truncate(q->file, end << q->cluster_bits);
    if (r < 0) {
        return r;
    }
    q->host_end = end << q->cluster_bits;
    q->free_hint = 1;
    /* Punch holes into the free clusters that remain below the end. */
    uint64_t run = 0;
    for (uint64_t c = 1; c <= end; c++) {
        uint64_t rc = 1;
        if (c < end) {
            r = qcow2_refcount_get(q, c, &rc);
            if (r < 0) {
                return r;
            }
        }
        if (rc == 0) {
            run++;
            continue;
        }
        if (run) {
            (void)ct_file_punch(q->file, (c - run) << q->cluster_bits, run << q->cluster_bits);
            run = 0;
        }
    }
    *new_end = end << q->cluster_bits;
    q->unsynced = true;
    return qcow2_barrier(q);
}

int qcow2_compact(struct qcow2_state *q, uint64_t *moved, uint64_t *new_end)
{
    int r = compact(q, moved, new_end);
    /* A failure part-way may leave a copied cluster unreferenced: keep the dirty bit (poison
     * the handle) so that the next read-write open frees it. */
    return r < 0 ? image_poison(q->img, r) : r;
}
