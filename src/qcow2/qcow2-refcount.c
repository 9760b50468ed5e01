/*
 * Refcounts: two-level table (refcount table in memory, refcount blocks through the cache),
 * the cluster allocator, and deferred frees (invariant Q4 in qcow2.h).
 *
 * Allocation: a run is chosen by scanning refcounts from free_hint; clusters whose refcount
 * block does not exist read as free. The chosen run is recorded in q->reserved while its
 * refcounts are set, because setting them may itself need new refcount blocks or a bigger
 * refcount table, and those nested allocations must not land inside the run.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2/qcow2.h"
#include "util/bswap.h"
#include "util/err.h"
#include "util/misc.h"

static uint64_t rb_entry_get(const struct qcow2_state *q, const uint8_t *t, uint64_t i)
{
    switch (q->refcount_bits) {
    case 8:
        return t[i];
    case 16:
        return ld_be16(t + i * 2);
    case 32:
        return ld_be32(t + i * 4);
    case 64:
        return ld_be64(t + i * 8);
    default: {
        uint64_t bit = i * q->refcount_bits;
        return (t[bit / 8] >> (bit % 8)) & ((1u << q->refcount_bits) - 1);
    }
    }
}

void qcow2_refblock_entry_set(const struct qcow2_state *q, uint8_t *t, uint64_t i, uint64_t v)
{
    switch (q->refcount_bits) {
    case 8:
        t[i] = (uint8_t)v;
        break;
    case 16:
        st_be16(t + i * 2, (uint16_t)v);
        break;
    case 32:
        st_be32(t + i * 4, (uint32_t)v);
        break;
    case 64:
        st_be64(t + i * 8, v);
        break;
    default: {
        uint64_t bit = i * q->refcount_bits;
        uint8_t mask = (uint8_t)(((1u << q->refcount_bits) - 1) << (bit % 8));
        t[bit / 8] = (uint8_t)((t[bit / 8] & ~mask) | ((v << (bit % 8)) & mask));
        break;
    }
    }
}

int qcow2_refcount_open(struct qcow2_state *q, struct ct_err *err)
{
    uint64_t bytes = (uint64_t)q->reftable_clusters * q->cluster_size;
    q->reftable_entries = bytes / 8;
    q->reftable = malloc(bytes ? bytes : 8);
    if (!q->reftable) {
        return ct_err_set(err, -ENOMEM, "out of memory for the refcount table");
    }
    if (q->reftable_broken) {
        memset(q->reftable, 0, bytes);
        return 0;
    }
    int r = ct_file_pread(q->file, q->reftable, bytes, q->reftable_offset);
    if (r < 0) {
        return ct_err_set(err, r, "Could not read the refcount table: %s", ct_strerror(r));
    }
    for (uint64_t i = 0; i < q->reftable_entries; i++) {
        q->reftable[i] = be64toh(q->reftable[i]);
        uint64_t off = q->reftable[i] & QCOW2_REFT_OFFSET_MASK;
        if (q->reftable[i] & QCOW2_REFT_RESERVED_MASK) {
            return ct_err_set(err, -CT_E_CORRUPT,
                              "refcount table entry %llu has reserved bits set (0x%llx)",
                              (unsigned long long)i, (unsigned long long)q->reftable[i]);
        }
        if (off & (q->cluster_size - 1)) {
            return ct_err_set(err, -CT_E_CORRUPT,
                              "refcount block offset 0x%llx (refcount table index %llu) is not "
                              "aligned to a cluster",
                              (unsigned long long)off, (unsigned long long)i);
        }
        if (off == q->l1_offset && off) {
            return ct_err_set(err, -CT_E_CORRUPT,
                              "refcount block %llu at 0x%llx overlaps the L1 table",
                              (unsigned long long)i, (unsigned long long)off);
        }
    }
    return 0;
}

int qcow2_refcount_get(struct qcow2_state *q, uint64_t cluster, uint64_t *out)
{
    uint64_t rt = cluster / q->refblock_entries;
    *out = 0;
    if (rt >= q->reftable_entries) {
        return 0;
    }
    uint64_t rb = q->reftable[rt] & QCOW2_REFT_OFFSET_MASK;
    if (!rb) {
        return 0;
    }
    struct qcow2_cache_entry *e;
    int r = qcow2_cache_get(&q->rb_cache, rb, false, &e);
    if (r < 0) {
        return r;
    }
    *out = rb_entry_get(q, e->table, cluster % q->refblock_entries);
    qcow2_cache_put(&q->rb_cache, e);
    return 0;
}

static bool is_reserved(const struct qcow2_state *q, uint64_t cluster)
{
    for (unsigned i = 0; i < q->nreserved; i++) {
        if (cluster >= q->reserved[i].start && cluster < q->reserved[i].start + q->reserved[i].n) {
            return true;
        }
    }
    return false;
}

static int reserve(struct qcow2_state *q, uint64_t start, uint64_t n)
{
    if (q->nreserved == CT_ARRAY_SIZE(q->reserved)) {
        return -ELOOP; /* allocator recursion deeper than any valid image needs */
    }
    q->reserved[q->nreserved].start = start;
    q->reserved[q->nreserved].n = n;
    q->nreserved++;
    return 0;
}

/* Is the cluster in use according to refcounts (and the repair map, and reservations)? */
static int cluster_used(struct qcow2_state *q, uint64_t c, bool *used)
{
    if (is_reserved(q, c) || (q->repair_refs && c < q->repair_nclusters && q->repair_refs[c]) ||
        qcow2_meta_type(q, c)) {
        *used = true;
        return 0;
    }
    uint64_t rc;
    int r = qcow2_refcount_get(q, c, &rc);
    *used = rc != 0;
    return r;
}

/*
 * Find a run of n free clusters (or the longest run up to n starting at the first free
 * cluster when `partial`). Walks whole refcount blocks at a time.
 */
static int find_free(struct qcow2_state *q, uint64_t n, bool partial, uint64_t *start,
                     uint64_t *got)
{
    uint64_t c = q->free_hint, run_start = c, run = 0;
    const uint64_t limit = QCOW2_MAX_HOST_OFFSET >> q->cluster_bits;
    while (c < limit) {
        uint64_t rt = c / q->refblock_entries;
        bool no_block = rt >= q->reftable_entries || !(q->reftable[rt] & QCOW2_REFT_OFFSET_MASK);
        if (no_block && q->nreserved == 0 && !q->repair_refs) {
            /* Whole block free: take as much as needed from it at once. */
            uint64_t block_end = (rt + 1) * q->refblock_entries;
            if (run == 0) {
                run_start = c;
            }
            uint64_t take = CT_MIN(block_end - c, n - run);
            /* Metadata never has refcount 0 in a sound image; in a damaged one, skip it. */
            uint64_t k = 0;
            while (k < take && !qcow2_meta_type(q, c + k)) {
                k++;
            }
            if (k < take) {
                if (partial && run + k > 0) {
                    run += k;
                    break;
                }
                run = 0;
                c += k + 1;
                continue;
            }
            run += take;
            c += take;
        } else {
            bool used;
            int r = cluster_used(q, c, &used);
            if (r < 0) {
                return r;
            }
            if (used) {
                if (partial && run > 0) {
                    break;
                }
                run = 0;
                c++;
                continue;
            }
            if (run == 0) {
                run_start = c;
            }
            run++;
            c++;
        }
        if (run == n) {
            break;
        }
    }
    if (run == 0 || (!partial && run < n)) {
        return -ENOSPC;
    }
    *start = run_start;
    *got = run;
    return 0;
}

static int grow_reftable(struct qcow2_state *q, uint64_t min_index);

/* Create the refcount block for table index rt (the table already covers rt). */
static int new_refblock(struct qcow2_state *q, uint64_t rt)
{
    uint64_t b, got;
    int r = find_free(q, 1, false, &b, &got);
    if (r < 0) {
        return r;
    }
    r = reserve(q, b, 1);
    if (r < 0) {
        return r;
    }
    bool self = b / q->refblock_entries == rt;
    if (q->repair_refs && b < q->repair_nclusters) {
        q->repair_refs[b]++; /* a repair's own allocation is a reference too */
    }
    if (!self) {
        /* Q2: the block's own refcount lives in another block, which must reach the disk
         * before the table entry that makes this block a reference. */
        r = qcow2_refcount_update(q, b, 1);
        if (r == 0) {
            r = qcow2_cache_flush(&q->rb_cache);
        }
        if (r < 0) {
            goto out;
        }
    }
    struct qcow2_cache_entry *e;
    r = qcow2_cache_get(&q->rb_cache, b << q->cluster_bits, true, &e);
    if (r < 0) {
        goto out;
    }
    r = qcow2_meta_add(q, b << q->cluster_bits, q->cluster_size, QCOW2_META_REFBLOCK);
    if (self && r == 0) {
        qcow2_refblock_entry_set(q, e->table, b % q->refblock_entries, 1);
        q->host_end = CT_MAX(q->host_end, (b + 1) << q->cluster_bits);
    }
    /* The block's content reaches the file before the table entry naming it. */
    e->dirty = true;
    r = qcow2_cache_write_entry(&q->rb_cache, e);
    qcow2_cache_put(&q->rb_cache, e);
    if (r == 0 && !q->reftable_pending) {
        r = qcow2_barrier(q); /* the block (and its refcount) before the table entry */
    }
    if (r < 0) {
        goto out;
    }
    q->reftable[rt] = b << q->cluster_bits;
    if (!q->reftable_pending) {
        uint64_t be = htobe64(q->reftable[rt]);
        r = ct_file_pwrite(q->file, &be, 8, q->reftable_offset + rt * 8);
        if (r < 0) {
            r = image_poison(q->img, r);
            goto out;
        }
        q->unsynced = true;
    }
out:
    q->nreserved--;
    return r;
}

static int refcount_modify(struct qcow2_state *q, uint64_t cluster, bool absolute, int64_t delta)
{
    uint64_t rt = cluster / q->refblock_entries;
    int r = qcow2_mark_dirty(q);
    if (r < 0) {
        return r;
    }
    if (rt >= q->reftable_entries) {
        r = grow_reftable(q, rt);
        if (r < 0) {
            return r;
        }
    }
    if (!(q->reftable[rt] & QCOW2_REFT_OFFSET_MASK)) {
        if (absolute && delta == 0) {
            return 0;
        }
        r = new_refblock(q, rt);
        if (r < 0) {
            return r;
        }
    }
    struct qcow2_cache_entry *e;
    r = qcow2_cache_get(&q->rb_cache, q->reftable[rt] & QCOW2_REFT_OFFSET_MASK, false, &e);
    if (r < 0) {
        return r;
    }
    uint64_t i = cluster % q->refblock_entries;
    uint64_t old = rb_entry_get(q, e->table, i), nv;
    if (absolute) {
        nv = (uint64_t)delta;
    } else if (delta < 0 && old < (uint64_t)-delta) {
        qcow2_cache_put(&q->rb_cache, e);
        return qcow2_corrupt(q, "refcount of cluster %llu would drop below zero",
                             (unsigned long long)cluster);
    } else {
        nv = old + (uint64_t)delta;
    }
    if (nv > q->refcount_max || (delta > 0 && !absolute && nv < old)) {
        qcow2_cache_put(&q->rb_cache, e);
        return -ERANGE;
    }
    qcow2_refblock_entry_set(q, e->table, i, nv);
    e->dirty = true;
    if (nv > 0 && ((cluster + 1) << q->cluster_bits) > q->host_end) {
        q->host_end = (cluster + 1) << q->cluster_bits;
    }
    qcow2_cache_put(&q->rb_cache, e);
    if (nv == 0 && cluster < q->free_hint) {
        q->free_hint = cluster;
    }
    return 0;
}

int qcow2_refcount_update(struct qcow2_state *q, uint64_t cluster, int64_t delta)
{
    return refcount_modify(q, cluster, false, delta);
}

int qcow2_refcount_set(struct qcow2_state *q, uint64_t cluster, uint64_t value)
{
    return refcount_modify(q, cluster, true, (int64_t)value);
}

/*
 * Grow the refcount table to cover index min_index (Q5): build the bigger table in memory,
 * account for its own clusters (which may create refcount blocks recorded only in the new
 * table), write it, barrier, point the header at it, barrier, free the old one later.
 */
static int grow_reftable(struct qcow2_state *q, uint64_t min_index)
{
    if (q->reftable_pending) {
        return qcow2_corrupt(q, "refcount table growth recursed");
    }
    uint64_t per_cluster = q->cluster_size / 8;
    uint64_t want = CT_MAX(min_index + 1, q->reftable_entries + q->reftable_entries / 2);
    /* Leave room for the table itself and its refcount blocks past the current end. */
    want += 8;
    uint64_t clusters = ct_div_round_up(want, per_cluster);
    if (clusters * q->cluster_size > QCOW2_MAX_REFTABLE_BYTES) {
        return -EFBIG;
    }
    uint64_t start, got;
    int r = find_free(q, clusters, false, &start, &got);
    if (r < 0) {
        return r;
    }
    if ((start + clusters) / q->refblock_entries + 2 >= clusters * per_cluster) {
        /* The new table would not even describe itself: take a bigger one. */
        clusters = ct_div_round_up((start + clusters) / q->refblock_entries + 16, per_cluster) + 1;
        r = find_free(q, clusters, false, &start, &got);
        if (r < 0) {
            return r;
        }
    }
    uint64_t entries = clusters * per_cluster;
    uint64_t *nt = calloc(entries, 8);
    if (!nt) {
        return -ENOMEM;
    }
    memcpy(nt, q->reftable, q->reftable_entries * 8);
    uint64_t *old = q->reftable;
    uint64_t old_off = q->reftable_offset, old_entries = q->reftable_entries;
    uint32_t old_clusters = q->reftable_clusters;
    q->reftable = nt;
    q->reftable_entries = entries;
    q->reftable_pending = true;
    r = reserve(q, start, clusters);
    if (r < 0) {
        goto fail;
    }
    for (uint64_t c = start; c < start + clusters && r == 0; c++) {
        r = qcow2_refcount_update(q, c, 1);
        if (q->repair_refs && c < q->repair_nclusters) {
            q->repair_refs[c]++;
        }
    }
    q->nreserved--;
    if (r < 0) {
        goto fail;
    }
    /* Write the new table, then switch the header to it. */
    uint64_t *be = malloc(entries * 8);
    if (!be) {
        r = -ENOMEM;
        goto fail;
    }
    for (uint64_t i = 0; i < entries; i++) {
        be[i] = htobe64(nt[i]);
    }
    r = ct_file_pwrite(q->file, be, entries * 8, start << q->cluster_bits);
    free(be);
    if (r < 0) {
        goto fail_poison;
    }
    q->unsynced = true;
    /* Q2/Q5: the table's own refcounts (and any new blocks) are on disk before the header
     * names the table. */
    r = qcow2_cache_flush(&q->rb_cache);
    if (r == 0) {
        r = qcow2_barrier(q);
    }
    if (r < 0) {
        goto fail_poison;
    }
    q->reftable_offset = start << q->cluster_bits;
    q->reftable_clusters = (uint32_t)clusters;
    r = qcow2_write_header_fields(q, QH_REFTABLE_OFFSET, 12);
    if (r < 0) {
        goto fail_poison;
    }
    r = qcow2_barrier(q);
    if (r < 0) {
        goto fail_poison;
    }
    q->reftable_pending = false;
    free(old);
    r = qcow2_meta_add(q, start << q->cluster_bits, clusters << q->cluster_bits,
                       QCOW2_META_REFTABLE);
    if (r < 0) {
        return r;
    }
    return qcow2_free_later(q, old_off, (uint64_t)old_clusters << q->cluster_bits);

fail_poison:
    r = image_poison(q->img, r);
fail:
    /* The in-memory state may reference blocks the disk table lacks: keep the handle poisoned
     * so nothing else is written; the clusters are at worst leaked. */
    q->reftable = old;
    q->reftable_entries = old_entries;
    q->reftable_pending = false;
    free(nt);
    return image_poison(q->img, r);
}

int qcow2_alloc_clusters_upto(struct qcow2_state *q, uint64_t n, uint64_t *host_off, uint64_t *got)
{
    uint64_t start, run;
    int r = find_free(q, n, true, &start, &run);
    if (r < 0) {
        return r;
    }
    r = reserve(q, start, run);
    if (r < 0) {
        return r;
    }
    for (uint64_t c = start; c < start + run && r == 0; c++) {
        r = qcow2_refcount_update(q, c, 1);
    }
    q->nreserved--;
    if (r < 0) {
        return r;
    }
    q->free_hint = start + run;
    *host_off = start << q->cluster_bits;
    *got = run;
    return 0;
}

int qcow2_alloc_clusters(struct qcow2_state *q, uint64_t n, uint64_t *host_off)
{
    uint64_t start, run;
    int r = find_free(q, n, false, &start, &run);
    if (r < 0) {
        return r;
    }
    r = reserve(q, start, n);
    if (r < 0) {
        return r;
    }
    for (uint64_t c = start; c < start + n && r == 0; c++) {
        r = qcow2_refcount_update(q, c, 1);
    }
    q->nreserved--;
    if (r < 0) {
        return r;
    }
    if (start == q->free_hint) {
        q->free_hint = start + n;
    }
    *host_off = start << q->cluster_bits;
    return 0;
}

int qcow2_free_later(struct qcow2_state *q, uint64_t off, uint64_t len)
{
    if (len == 0) {
        return 0;
    }
    if (q->npending) {
        struct qcow2_pending_free *last = &q->pending[q->npending - 1];
        if (last->off + last->len == off && !((off | len) & (q->cluster_size - 1))) {
            last->len += len; /* consecutive clusters: one range */
            return 0;
        }
    }
    if (q->npending == q->pending_cap) {
        size_t cap = q->pending_cap ? q->pending_cap * 2 : 64;
        struct qcow2_pending_free *p = realloc(q->pending, cap * sizeof(*p));
        if (!p) {
            return -ENOMEM;
        }
        q->pending = p;
        q->pending_cap = cap;
    }
    q->pending[q->npending].off = off;
    q->pending[q->npending].len = len;
    q->npending++;
    if (q->npending >= (1u << 20)) {
        return qcow2_flush_metadata(q); /* bound the list: 16 MiB */
    }
    return 0;
}

int qcow2_apply_pending_frees(struct qcow2_state *q)
{
    if (q->npending) {
        /* The cluster compressed data was being packed into may be among the freed ones (and
         * then reused for anything): start packing afresh. */
        q->cfree_off = 0;
    }
    for (size_t i = 0; i < q->npending; i++) {
        uint64_t first = q->pending[i].off >> q->cluster_bits;
        uint64_t last = (q->pending[i].off + q->pending[i].len - 1) >> q->cluster_bits;
        for (uint64_t c = first; c <= last; c++) {
            qcow2_cache_discard(&q->l2_cache, c << q->cluster_bits);
            int r = qcow2_refcount_update(q, c, -1);
            uint64_t left = 1;
            if (r == 0 && qcow2_refcount_get(q, c, &left) == 0 && left == 0) {
                qcow2_meta_remove(q, c); /* no longer anything's metadata */
            }
            if (r < 0) {
                /* Remaining entries stay queued: at worst leaks. */
                memmove(q->pending, q->pending + i, (q->npending - i) * sizeof(*q->pending));
                q->npending -= i;
                return r;
            }
        }
    }
    q->npending = 0;
    return 0;
}
