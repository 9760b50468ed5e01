/*
 * Consistency check and repair with qemu-img check's semantics: count every reference
 * (header, L1/L2 of the active state and of every snapshot, data and compressed clusters,
 * refcount structures, snapshot table, persistent bitmaps) and compare with the stored
 * refcounts; check COPIED flags of the active tables against the refcounts.
 *
 * Repair sets refcounts to the counted values (leaks with CT_FIX_LEAKS, too-low refcounts
 * with CT_FIX_ERRORS) and fixes COPIED flags. While repairing, the allocator also treats every
 * counted cluster as used (q->repair_refs), so a refcount block created by the repair never
 * lands on a cluster whose refcount was wrongly zero.
 *
 * Memory. A check that repairs nothing keeps one byte per host cluster, in pages of 64 Ki
 * clusters allocated when first touched (a sparse or short file pays for what it uses),
 * with counts of 255 and more in a small hash table (shared clusters that many snapshots
 * reference); it reads refcount blocks and L2 tables straight into scratch buffers, one at a
 * time, instead of filling the metadata caches; and the COPIED pass takes stored refcounts
 * from the counts just compared (they are equal except for the clusters compare_refs found
 * differing, which it remembers). A 1 TiB image with every cluster allocated thus needs
 * 16 MiB of counts instead of 64 MiB of counts plus 40 MiB of caches. A repair keeps the
 * flat uint32 array the allocator reads (q->repair_refs) and goes through the caches, which
 * its writes must stay coherent with.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2/qcow2.h"
#include "util/bswap.h"
#include "util/err.h"
#include "util/misc.h"

/* Open-addressing map cluster -> count (key stored + 1; 0 = empty slot). */
struct u64map {
    uint64_t *keys, *vals;
    size_t cap, n;
};

static uint64_t *map_find(struct u64map *m, uint64_t key, bool add)
{
    if (add && (m->n + 1) * 2 > m->cap) {
        size_t ncap = m->cap ? m->cap * 2 : 1024;
        uint64_t *nk = calloc(ncap, sizeof(*nk)), *nv = calloc(ncap, sizeof(*nv));
        if (!nk || !nv) {
            free(nk);
            free(nv);
            return NULL;
        }
        for (size_t i = 0; i < m->cap; i++) {
            if (m->keys[i]) {
                size_t h = (size_t)((m->keys[i] * 0x9e3779b97f4a7c15ull) >> 20) & (ncap - 1);
                while (nk[h]) {
                    h = (h + 1) & (ncap - 1);
                }
                nk[h] = m->keys[i];
                nv[h] = m->vals[i];
            }
        }
        free(m->keys);
        free(m->vals);
        m->keys = nk;
        m->vals = nv;
        m->cap = ncap;
    }
    if (!m->cap) {
        return NULL;
    }
    uint64_t k = key + 1;
    size_t h = (size_t)((k * 0x9e3779b97f4a7c15ull) >> 20) & (m->cap - 1);
    while (m->keys[h] && m->keys[h] != k) {
        h = (h + 1) & (m->cap - 1);
    }
    if (!m->keys[h]) {
        if (!add) {
            return NULL;
        }
        m->keys[h] = k;
        m->vals[h] = 0;
        m->n++;
    }
    return &m->vals[h];
}

static void map_free(struct u64map *m)
{
    free(m->keys);
    free(m->vals);
    memset(m, 0, sizeof(*m));
}

#define PAGE_BITS 16
#define PAGE_SIZE (1u << PAGE_BITS)
#define BIG       255u /* a page byte of BIG: the count is in the big map */

/* The counted references: flat uint32 (repair) or paged bytes (check only). */
struct refcounts {
    uint32_t *flat;
    uint8_t **pages;
    uint64_t npages;
    struct u64map big;
    bool oom; /* a page or map entry could not be allocated: the check fails */
};

struct check {
    struct qcow2_state *q;
    struct refcounts rc;
    uint64_t nclusters;
    struct ct_check_result *res;
    ct_check_report_fn report;
    void *opaque;
    uint64_t file_size;
    uint8_t *table;     /* one cluster, scratch */
    bool refblocks_bad; /* a refcount block is unusable: rebuild instead of patching */
    /* Check without repair: stored refcounts that differ from the counts (compare_refs), for
     * the COPIED pass; stored_all_known false when some could not be read or too many differ
     * (then the COPIED pass asks the refcount blocks). Clusters from stored_upto on were not
     * compared. */
    struct u64map stored_diff;
    bool stored_all_known;
    uint64_t stored_upto;
};

static uint64_t refs_get(const struct check *c, uint64_t k)
{
    const struct refcounts *rc = &c->rc;
    if (rc->flat) {
        return rc->flat[k];
    }
    const uint8_t *pg = rc->pages[k >> PAGE_BITS];
    if (!pg) {
        return 0;
    }
    uint8_t v = pg[k & (PAGE_SIZE - 1)];
    if (v != BIG) {
        return v;
    }
    uint64_t *b = map_find((struct u64map *)&rc->big, k, false);
    return b ? *b : BIG;
}

static void refs_add(struct check *c, uint64_t k, int delta)
{
    struct refcounts *rc = &c->rc;
    if (rc->flat) {
        if (delta > 0 && rc->flat[k] < UINT32_MAX) {
            rc->flat[k]++;
        } else if (delta < 0 && rc->flat[k]) {
            rc->flat[k]--;
        }
        return;
    }
    uint8_t **pg = &rc->pages[k >> PAGE_BITS];
    if (!*pg) {
        if (delta < 0 || !(*pg = calloc(1, PAGE_SIZE))) {
            rc->oom = rc->oom || delta > 0;
            return;
        }
    }
    uint8_t *v = &(*pg)[k & (PAGE_SIZE - 1)];
    if (*v < BIG - 1 || (*v == BIG - 1 && delta < 0)) {
        if (delta > 0) {
            (*v)++;
        } else if (*v) {
            (*v)--;
        }
        return;
    }
    uint64_t *b = map_find(&rc->big, k, true);
    if (!b) {
        rc->oom = true;
        return;
    }
    if (*v == BIG - 1) {
        *v = BIG;
        *b = BIG; /* delta > 0 here */
        return;
    }
    if (delta > 0 && *b < UINT64_MAX) {
        (*b)++;
    } else if (delta < 0 && *b) {
        (*b)--; /* stays in the map, whatever its value */
    }
}

static void refs_clear(struct check *c)
{
    struct refcounts *rc = &c->rc;
    if (rc->flat) {
        memset(rc->flat, 0, c->nclusters * sizeof(*rc->flat));
        return;
    }
    for (uint64_t i = 0; i < rc->npages; i++) {
        free(rc->pages[i]);
        rc->pages[i] = NULL;
    }
    map_free(&rc->big);
}

/* Highest counted cluster + 1 (0 when none). */
static uint64_t refs_end(const struct check *c)
{
    uint64_t k = c->nclusters;
    while (k > 0) {
        uint64_t pg = (k - 1) >> PAGE_BITS;
        if (!c->rc.flat && !c->rc.pages[pg]) {
            k = pg << PAGE_BITS; /* an absent page counts nothing */
            continue;
        }
        if (refs_get(c, k - 1)) {
            return k;
        }
        k--;
    }
    return 0;
}

static void say(struct check *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void say(struct check *c, const char *fmt, ...)
{
    if (!c->report) {
        return;
    }
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    c->report(c->opaque, line);
}

/* Count one reference to every cluster [off, off+len) touches. */
static void ref_range(struct check *c, uint64_t off, uint64_t len, const char *what)
{
    if (len == 0) {
        return;
    }
    struct qcow2_state *q = c->q;
    uint64_t first = off >> q->cluster_bits, last = (off + len - 1) >> q->cluster_bits;
    for (uint64_t k = first; k <= last; k++) {
        if (k >= c->nclusters) {
            say(c, "ERROR %s offset=%" PRIx64 ": Cluster is outside the image file", what,
                k << q->cluster_bits);
            c->res->corruptions++;
            return;
        }
        refs_add(c, k, 1);
    }
}

static int read_table(struct check *c, uint64_t off, void *buf, uint64_t len)
{
    int r = ct_file_pread(c->q->file, buf, len, off);
    if (r < 0) {
        c->res->check_errors++;
    }
    return r;
}

/* Walk one L1 table. active: collect statistics and return L2/data info for COPIED checks. */
static int walk_l1(struct check *c, uint64_t l1_off, uint32_t l1_size, bool active)
{
    struct qcow2_state *q = c->q;
    uint64_t *l1 = malloc((uint64_t)l1_size * 8 + 8);
    if (!l1) {
        return -ENOMEM;
    }
    ref_range(c, l1_off, (uint64_t)l1_size * 8, "L1 table");
    int r = read_table(c, l1_off, l1, (uint64_t)l1_size * 8);
    if (r < 0) {
        free(l1);
        return 0;
    }
    for (uint32_t i = 0; i < l1_size; i++) {
        uint64_t prev_host = 0; /* contiguity is judged within one L2 table, as qemu-img does */
        uint64_t l1e = be64toh(l1[i]);
        uint64_t l2off = l1e & QCOW2_L1E_OFFSET_MASK;
        if (l1e & QCOW2_L1E_RESERVED_MASK) {
            say(c, "ERROR: L1 entry %u has reserved bits set: 0x%" PRIx64, i, l1e);
            c->res->corruptions++;
        }
        if (!l2off) {
            continue;
        }
        if (l2off & (q->cluster_size - 1)) {
            say(c, "ERROR l2_offset=%" PRIx64 ": Table is not cluster aligned; L1 entry corrupted",
                l2off);
            c->res->corruptions++;
            continue;
        }
        ref_range(c, l2off, q->cluster_size, "L2 table");
        if (l2off >= c->file_size) {
            say(c, "ERROR l2_offset=%" PRIx64 ": L2 table is beyond the end of the image file",
                l2off);
            c->res->corruptions++;
            continue;
        }
        if (read_table(c, l2off, c->table, q->cluster_size) < 0) {
            continue;
        }
        for (uint64_t j = 0; j < q->l2_entries; j++) {
            uint64_t l2e = ld_be64(c->table + j * q->l2_entry_bytes);
            uint64_t bm = q->ext_l2 ? ld_be64(c->table + j * q->l2_entry_bytes + 8) : 0;
            uint64_t guest = ((uint64_t)i * q->l2_entries + j) << q->cluster_bits;
            if (l2e & QCOW2_OFLAG_COMPRESSED) {
                uint64_t off, len;
                qcow2_compressed_range(q, l2e, &off, &len);
                if (l2e & QCOW2_OFLAG_COPIED) {
                    say(c, "ERROR: coffset=0x%" PRIx64 ": Compressed cluster has COPIED flag set",
                        off);
                    c->res->corruptions++;
                }
                if (off >= c->file_size) {
                    say(c,
                        "ERROR compressed cluster at 0x%" PRIx64
                        " is beyond the end of the image file",
                        off);
                    c->res->corruptions++;
                }
                ref_range(c, off, len, "compressed cluster");
                if (active) {
                    c->res->allocated_clusters++;
                    c->res->compressed_clusters++;
                    c->res->fragmented_clusters++; /* qemu-img counts them as fragmented */
                }
                continue;
            }
            uint64_t host = l2e & QCOW2_L2E_OFFSET_MASK;
            uint64_t reserved =
                QCOW2_L2E_STD_RESERVED_MASK | (q->version < 3 || q->ext_l2 ? QCOW2_OFLAG_ZERO : 0);
            if (l2e & reserved) {
                say(c,
                    "ERROR: L2 entry 0x%" PRIx64 " at guest offset 0x%" PRIx64
                    " has reserved bits set",
                    l2e, guest);
                c->res->corruptions++;
            }
            if (q->ext_l2 && (bm & (bm >> 32) & 0xffffffffull)) {
                say(c, "ERROR invalid subcluster bitmap 0x%" PRIx64 " at guest offset 0x%" PRIx64,
                    bm, guest);
                c->res->corruptions++;
            }
            if (!host) {
                continue;
            }
            if (host & (q->cluster_size - 1)) {
                say(c,
                    "ERROR offset=%" PRIx64 ": Cluster is not properly aligned; L2 entry "
                    "corrupted.",
                    host);
                c->res->corruptions++;
                continue;
            }
            if (host >= c->file_size) {
                say(c,
                    "ERROR offset=%" PRIx64 ": data cluster is beyond the end of the image "
                    "file",
                    host);
                c->res->corruptions++;
            }
            ref_range(c, host, q->cluster_size, "data cluster");
            if (active) {
                c->res->allocated_clusters++;
                if (prev_host && host != prev_host + q->cluster_size) {
                    c->res->fragmented_clusters++;
                }
                prev_host = host;
            }
        }
    }
    free(l1);
    return 0;
}

static void walk_bitmaps(struct check *c)
{
    struct qcow2_state *q = c->q;
    if (!q->bitmaps_ext || q->bitmaps_ext_len < 24) {
        return;
    }
    uint64_t dir_size = ld_be64(q->bitmaps_ext + 8), dir_off = ld_be64(q->bitmaps_ext + 16);
    if (dir_size > (64u << 20) || dir_off >= c->file_size) {
        say(c, "ERROR bitmap directory is invalid");
        c->res->corruptions++;
        return;
    }
    ref_range(c, dir_off, dir_size, "bitmap directory");
    uint8_t *dir = malloc(dir_size + 1);
    if (!dir || read_table(c, dir_off, dir, dir_size) < 0) {
        free(dir);
        return;
    }
    for (uint64_t p = 0; p + 24 <= dir_size;) {
        uint64_t toff = ld_be64(dir + p);
        uint32_t tsize = ld_be32(dir + p + 8);
        uint16_t name = ld_be16(dir + p + 18);
        uint32_t extra = ld_be32(dir + p + 20);
        if ((uint64_t)tsize * 8 <= (64u << 20) && toff && toff < c->file_size) {
            ref_range(c, toff, (uint64_t)tsize * 8, "bitmap table");
            uint64_t *t = malloc((uint64_t)tsize * 8 + 8);
            if (t && read_table(c, toff, t, (uint64_t)tsize * 8) == 0) {
                for (uint32_t k = 0; k < tsize; k++) {
                    uint64_t e = be64toh(t[k]) & QCOW2_L2E_OFFSET_MASK;
                    if (e) {
                        ref_range(c, e, q->cluster_size, "bitmap data");
                    }
                }
            }
            free(t);
        }
        p += ct_align_up(24 + (uint64_t)extra + name, 8);
    }
    free(dir);
}

static int count_refs(struct check *c)
{
    struct qcow2_state *q = c->q;
    refs_clear(c);
    ref_range(c, 0, q->cluster_size, "header");
    int r = walk_l1(c, q->l1_offset, q->l1_size, true);
    for (uint32_t i = 0; r == 0 && i < q->nb_snapshots; i++) {
        r = walk_l1(c, q->snapshots[i].l1_offset, q->snapshots[i].l1_size, false);
    }
    if (r < 0) {
        return r;
    }
    if (q->nb_snapshots) {
        uint64_t len = 0;
        for (uint32_t i = 0; i < q->nb_snapshots; i++) {
            const struct qcow2_snapshot *s = &q->snapshots[i];
            len += ct_align_up(QS_FIXED_LEN + s->extra_size + strlen(s->id) + strlen(s->name), 8);
        }
        ref_range(c, q->snapshots_offset, len, "snapshot table");
    }
    if (!q->reftable_broken) {
        ref_range(c, q->reftable_offset, (uint64_t)q->reftable_clusters << q->cluster_bits,
                  "refcount table");
    }
    for (uint64_t i = 0; !q->reftable_broken && i < q->reftable_entries; i++) {
        uint64_t rb = q->reftable[i] & QCOW2_REFT_OFFSET_MASK;
        if (rb) {
            if (rb >= c->file_size || (rb & (q->cluster_size - 1))) {
                say(c, "ERROR refcount block %" PRIu64 " is outside image or unaligned", i);
                c->res->corruptions++;
                c->refblocks_bad = true;
                continue;
            }
            ref_range(c, rb, q->cluster_size, "refcount block");
        }
    }
    walk_bitmaps(c);
    for (uint64_t i = 0; !q->reftable_broken && i < q->reftable_entries; i++) {
        uint64_t rb = (q->reftable[i] & QCOW2_REFT_OFFSET_MASK) >> q->cluster_bits;
        if (rb && rb < c->nclusters && refs_get(c, rb) > 1) {
            say(c,
                "ERROR refcount block %" PRIu64 " at cluster %" PRIu64
                " overlaps other metadata or data",
                i, rb);
            c->res->corruptions++;
            c->refblocks_bad = true;
        }
    }
    /* Referenced clusters in a range without a refcount block: rebuild rather than patch. */
    for (uint64_t k = 0; !q->reftable_broken && k < c->nclusters; k += q->refblock_entries) {
        uint64_t rt = k / q->refblock_entries;
        if (rt < q->reftable_entries && (q->reftable[rt] & QCOW2_REFT_OFFSET_MASK)) {
            continue;
        }
        uint64_t e = CT_MIN(c->nclusters, k + q->refblock_entries);
        for (uint64_t j = k; j < e; j++) {
            if (!c->rc.flat && !c->rc.pages[j >> PAGE_BITS]) {
                j |= PAGE_SIZE - 1; /* an absent page counts nothing */
                continue;
            }
            if (refs_get(c, j)) {
                say(c, "ERROR refcount block %" PRIu64 " is missing for cluster %" PRIu64, rt, j);
                c->res->corruptions++;
                c->refblocks_bad = true;
                break;
            }
        }
    }
    return c->rc.oom ? -ENOMEM : 0;
}

/*
 * Build new refcount structures from the counted references, placed after everything in use:
 * new refcount blocks and a new table are written, then (barrier) the header switches to
 * them. The old structures become unreferenced space.
 */
static int rebuild_refcounts(struct check *c)
{
    struct qcow2_state *q = c->q;
    /* Counted references without the old refcount structures. */
    if (!q->reftable_broken) {
        uint64_t first = q->reftable_offset >> q->cluster_bits;
        for (uint64_t k = 0; k < q->reftable_clusters && first + k < c->nclusters; k++) {
            refs_add(c, first + k, -1);
        }
        for (uint64_t i = 0; i < q->reftable_entries; i++) {
            uint64_t rb = (q->reftable[i] & QCOW2_REFT_OFFSET_MASK) >> q->cluster_bits;
            if (rb && rb < c->nclusters) {
                refs_add(c, rb, -1);
            }
        }
    }
    uint64_t end = 1;
    for (uint64_t k = 0; k < c->nclusters; k++) {
        uint64_t v = refs_get(c, k);
        if (v) {
            end = k + 1;
            if (v > q->refcount_max) {
                return -ERANGE;
            }
        }
    }
    end = CT_MAX(end, ct_div_round_up(c->file_size, q->cluster_size));
    uint64_t epb = q->refblock_entries, per = q->cluster_size / 8;
    uint64_t nb = 1, nt = 1;
    for (;;) {
        uint64_t total = end + nb + nt;
        uint64_t nb2 = ct_div_round_up(total, epb), nt2 = ct_div_round_up(nb2, per);
        if (nb2 <= nb && nt2 <= nt) {
            break;
        }
        nb = CT_MAX(nb, nb2);
        nt = CT_MAX(nt, nt2);
    }
    if (nt * q->cluster_size > QCOW2_MAX_REFTABLE_BYTES) {
        return -EFBIG;
    }
    uint64_t blocks_at = end, table_at = end + nb;
    uint64_t *table = calloc(nt * per, 8);
    uint8_t *blk = calloc(1, q->cluster_size);
    int r = table && blk ? 0 : -ENOMEM;
    for (uint64_t b = 0; r == 0 && b < nb; b++) {
        memset(blk, 0, q->cluster_size);
        for (uint64_t k = 0; k < epb; k++) {
            uint64_t cl = b * epb + k, v = cl < c->nclusters ? refs_get(c, cl) : 0;
            if (cl >= end && cl < end + nb + nt) {
                v = 1; /* the new blocks and table themselves */
            }
            if (v) {
                qcow2_refblock_entry_set(q, blk, k, v);
            }
        }
        table[b] = (blocks_at + b) << q->cluster_bits;
        r = ct_file_pwrite(q->file, blk, q->cluster_size, (blocks_at + b) << q->cluster_bits);
    }
    uint64_t *be = r == 0 ? malloc(nt * q->cluster_size) : NULL;
    if (r == 0 && !be) {
        r = -ENOMEM;
    }
    for (uint64_t i = 0; r == 0 && i < nt * per; i++) {
        be[i] = htobe64(table[i]);
    }
    if (r == 0) {
        r = ct_file_pwrite(q->file, be, nt * q->cluster_size, table_at << q->cluster_bits);
    }
    free(be);
    free(blk);
    if (r == 0) {
        q->unsynced = true;
        r = qcow2_barrier(q);
    }
    if (r < 0) {
        free(table);
        return image_poison(q->img, r);
    }
    /* Switch: the header now names the new table (Q5). */
    qcow2_cache_drop_all(&q->rb_cache);
    free(q->reftable);
    q->reftable = table;
    q->reftable_entries = nt * per;
    q->reftable_offset = table_at << q->cluster_bits;
    q->reftable_clusters = (uint32_t)nt;
    q->reftable_broken = false;
    q->host_end = CT_MAX(q->host_end, (table_at + nt) << q->cluster_bits);
    qcow2_meta_add(q, blocks_at << q->cluster_bits, nb << q->cluster_bits, QCOW2_META_REFBLOCK);
    qcow2_meta_add(q, table_at << q->cluster_bits, nt << q->cluster_bits, QCOW2_META_REFTABLE);
    r = qcow2_write_header_fields(q, QH_REFTABLE_OFFSET, 12);
    if (r == 0) {
        r = qcow2_barrier(q);
    }
    int64_t fsz = ct_file_size(q->file);
    if (fsz > 0) {
        c->file_size = (uint64_t)fsz;
    }
    return r;
}

static uint64_t rb_entry(const struct qcow2_state *q, const uint8_t *t, uint64_t i)
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

/* Differing stored refcounts kept for the COPIED pass before it asks the refcount blocks. */
#define STORED_DIFF_MAX (1u << 20)

/* Compare counted references with stored refcounts; fix according to `fix`. Without fix,
 * each refcount block is read once into the scratch buffer (no cache); with fix, through the
 * cache its updates go to. */
static int compare_refs(struct check *c, unsigned fix)
{
    struct qcow2_state *q = c->q;
    uint64_t n = CT_MAX(c->nclusters, q->reftable_entries * q->refblock_entries);
    n = CT_MIN(n, c->nclusters + q->refblock_entries * 4);
    map_free(&c->stored_diff);
    c->stored_all_known = !fix;
    c->stored_upto = n;
    uint64_t blk_loaded = UINT64_MAX; /* refcount block index in c->table, or none */
    for (uint64_t k = 0; k < n; k++) {
        uint64_t rc;
        uint64_t rt = k / q->refblock_entries;
        uint64_t rb =
            !fix && rt < q->reftable_entries ? q->reftable[rt] & QCOW2_REFT_OFFSET_MASK : 0;
        if (rb && !(rb & (q->cluster_size - 1)) && rb < c->file_size) {
            if (blk_loaded != rt) {
                blk_loaded = UINT64_MAX;
                if (ct_file_pread(q->file, c->table, q->cluster_size, rb) == 0) {
                    blk_loaded = rt;
                }
            }
            if (blk_loaded != rt) {
                c->res->check_errors++;
                c->stored_all_known = false;
                continue;
            }
            rc = rb_entry(q, c->table, k % q->refblock_entries);
        } else if (qcow2_refcount_get(q, k, &rc) < 0) {
            c->res->check_errors++;
            c->stored_all_known = false;
            continue;
        }
        uint64_t want = k < c->nclusters ? refs_get(c, k) : 0;
        if (rc == want) {
            continue;
        }
        if (c->stored_all_known) {
            uint64_t *d =
                c->stored_diff.n < STORED_DIFF_MAX ? map_find(&c->stored_diff, k, true) : NULL;
            if (d) {
                *d = rc;
            } else {
                c->stored_all_known = false;
            }
        }
        bool leak = rc > want;
        if (want > q->refcount_max) {
            say(c, "ERROR cluster %" PRIu64 " refcount overflow (reference=%" PRIu64 ")", k, want);
            c->res->corruptions++;
            continue;
        }
        bool fixing = leak ? (fix & CT_FIX_LEAKS) : (fix & CT_FIX_ERRORS);
        say(c, "%s cluster %" PRIu64 " refcount=%" PRIu64 " reference=%" PRIu64,
            fixing ? "Repairing" : (leak ? "Leaked" : "ERROR"), k, rc, want);
        if (leak) {
            c->res->leaks++;
        } else {
            c->res->corruptions++;
        }
        if (fixing) {
            int r = qcow2_refcount_set(q, k, want);
            if (r < 0) {
                c->res->check_errors++;
                return r;
            }
            if (leak) {
                c->res->leaks_fixed++;
            } else {
                c->res->corruptions_fixed++;
            }
        }
    }
    return 0;
}

/* The stored refcount of cluster k, known from compare_refs when it could be. */
static int stored_refcount(struct check *c, uint64_t k, uint64_t *out)
{
    if (c->stored_all_known && k < c->stored_upto) {
        uint64_t *d = map_find(&c->stored_diff, k, false);
        *out = d ? *d : (k < c->nclusters ? refs_get(c, k) : 0);
        return 0;
    }
    return qcow2_refcount_get(c->q, k, out);
}

/* COPIED check without repair: L2 tables read straight into the scratch buffer, stored
 * refcounts from stored_refcount(); reports exactly what check_copied() does. */
static void check_copied_ro(struct check *c)
{
    struct qcow2_state *q = c->q;
    for (uint32_t i = 0; i < q->l1_size; i++) {
        uint64_t l1e = q->l1[i], l2off = l1e & QCOW2_L1E_OFFSET_MASK;
        if (!l2off || (l2off & (q->cluster_size - 1)) || l2off >= c->file_size) {
            continue;
        }
        uint64_t rc;
        if (stored_refcount(c, l2off >> q->cluster_bits, &rc) < 0) {
            c->res->check_errors++;
            continue;
        }
        if ((rc == 1) != ((l1e & QCOW2_OFLAG_COPIED) != 0)) {
            say(c,
                "ERROR OFLAG_COPIED L2 cluster: l1_index=%u l1_entry=%" PRIx64 " refcount=%" PRIu64,
                i, l1e, rc);
            c->res->corruptions++;
        }
        if (ct_file_pread(q->file, c->table, q->cluster_size, l2off) < 0) {
            c->res->check_errors++;
            continue;
        }
        for (uint64_t j = 0; j < q->l2_entries; j++) {
            uint64_t l2e = ld_be64(c->table + j * q->l2_entry_bytes);
            uint64_t host = l2e & QCOW2_L2E_OFFSET_MASK;
            if ((l2e & QCOW2_OFLAG_COMPRESSED) || !host || (host & (q->cluster_size - 1))) {
                continue;
            }
            uint64_t drc;
            if (stored_refcount(c, host >> q->cluster_bits, &drc) < 0) {
                c->res->check_errors++;
                continue;
            }
            if ((drc == 1) != ((l2e & QCOW2_OFLAG_COPIED) != 0)) {
                say(c, "ERROR OFLAG_COPIED data cluster: l2_entry=%" PRIx64 " refcount=%" PRIu64,
                    l2e, drc);
                c->res->corruptions++;
            }
        }
    }
}

/* COPIED flags of the active L1 and L2 tables must say "refcount == 1". */
static int check_copied(struct check *c, unsigned fix)
{
    struct qcow2_state *q = c->q;
    /* COPIED flags follow the refcounts just checked: with -r leaks they are repaired too when
     * nothing else is wrong (the refcounts are then known to be right), as qemu-img does. */
    const struct ct_check_result *res = c->res;
    bool repair = (fix & CT_FIX_ERRORS) ||
                  ((fix & CT_FIX_LEAKS) && !res->check_errors &&
                   res->corruptions == res->corruptions_fixed && res->leaks == res->leaks_fixed);
    if (!fix) {
        check_copied_ro(c);
        return 0;
    }
    for (uint32_t i = 0; i < q->l1_size; i++) {
        uint64_t l1e = q->l1[i], l2off = l1e & QCOW2_L1E_OFFSET_MASK;
        if (!l2off || (l2off & (q->cluster_size - 1)) || l2off >= c->file_size) {
            continue;
        }
        uint64_t rc;
        if (qcow2_refcount_get(q, l2off >> q->cluster_bits, &rc) < 0) {
            c->res->check_errors++;
            continue;
        }
        bool want = rc == 1;
        if (want != ((l1e & QCOW2_OFLAG_COPIED) != 0)) {
            bool fixing = repair;
            say(c, "%s OFLAG_COPIED L2 cluster: l1_index=%u l1_entry=%" PRIx64 " refcount=%" PRIu64,
                fixing ? "Repairing" : "ERROR", i, l1e, rc);
            c->res->corruptions++;
            if (fixing) {
                q->l1[i] = want ? (l1e | QCOW2_OFLAG_COPIED) : (l1e & ~QCOW2_OFLAG_COPIED);
                q->l1_dirty_lo = CT_MIN(q->l1_dirty_lo, i);
                q->l1_dirty_hi = CT_MAX(q->l1_dirty_hi, i + 1);
                c->res->corruptions_fixed++;
            }
        }
        struct qcow2_cache_entry *e;
        if (qcow2_cache_get(&q->l2_cache, l2off, false, &e) < 0) {
            c->res->check_errors++;
            continue;
        }
        for (uint64_t j = 0; j < q->l2_entries; j++) {
            uint64_t l2e = ld_be64(e->table + j * q->l2_entry_bytes);
            uint64_t host = l2e & QCOW2_L2E_OFFSET_MASK;
            if ((l2e & QCOW2_OFLAG_COMPRESSED) || !host || (host & (q->cluster_size - 1))) {
                continue;
            }
            uint64_t drc;
            if (qcow2_refcount_get(q, host >> q->cluster_bits, &drc) < 0) {
                c->res->check_errors++;
                continue;
            }
            bool dwant = drc == 1;
            if (dwant != ((l2e & QCOW2_OFLAG_COPIED) != 0)) {
                bool fixing = repair && rc == 1;
                say(c, "%s OFLAG_COPIED data cluster: l2_entry=%" PRIx64 " refcount=%" PRIu64,
                    fixing ? "Repairing" : "ERROR", l2e, drc);
                c->res->corruptions++;
                if (fixing) {
                    st_be64(e->table + j * q->l2_entry_bytes,
                            dwant ? (l2e | QCOW2_OFLAG_COPIED) : (l2e & ~QCOW2_OFLAG_COPIED));
                    e->dirty = true;
                    c->res->corruptions_fixed++;
                }
            }
        }
        qcow2_cache_put(&q->l2_cache, e);
    }
    return 0;
}

static int run_pass(struct check *c, unsigned fix)
{
    int r = count_refs(c);
    if (r == 0) {
        r = compare_refs(c, fix);
    }
    if (r == 0) {
        r = check_copied(c, fix);
    }
    return r;
}

int qcow2_check(struct ct_image *img, unsigned fix, struct ct_check_result *res,
                ct_check_report_fn report, void *opaque, struct ct_err *err)
{
    struct qcow2_state *q = qstate(img);
    int r = 0;
    memset(res, 0, sizeof(*res));
    if (img->writable && !img->poison) {
        r = qcow2_flush_metadata(q);
        if (r < 0) {
            return ct_err_set(err, r, "flush before check failed: %s", ct_strerror(r));
        }
    }
    int64_t fsz = ct_file_size(q->file);
    if (fsz < 0) {
        return ct_err_set(err, (int)fsz, "Could not get the file size");
    }
    struct check c = {.q = q, .res = res, .report = report, .opaque = opaque};
    c.file_size = (uint64_t)fsz;
    /* Room for clusters a repair may add past the end (new refcount blocks). */
    c.nclusters = ct_div_round_up(c.file_size, q->cluster_size);
    c.nclusters += 64 + 2 * ct_div_round_up(c.nclusters, q->refblock_entries);
    bool ok;
    if (fix) {
        ok = (c.rc.flat = calloc(c.nclusters, sizeof(*c.rc.flat))) != NULL;
    } else {
        c.rc.npages = (c.nclusters + PAGE_SIZE - 1) >> PAGE_BITS;
        ok = (c.rc.pages = calloc(c.rc.npages, sizeof(*c.rc.pages))) != NULL;
    }
    c.table = malloc(q->cluster_size);
    if (!ok || !c.table) {
        free(c.rc.flat);
        free(c.rc.pages);
        free(c.table);
        return ct_err_set(err, -ENOMEM, "out of memory for the check (%" PRIu64 " clusters)",
                          c.nclusters);
    }
    res->total_clusters = ct_div_round_up(img->size, q->cluster_size);
    if (fix) {
        r = qcow2_mark_dirty(q);
        if (r < 0) {
            goto out;
        }
        q->repair_refs = c.rc.flat;
        q->repair_nclusters = c.nclusters;
    }
    if ((fix & CT_FIX_ERRORS) && q->reftable_broken) {
        say(&c, "Rebuilding refcount structure (the refcount table is unusable)");
        r = count_refs(&c);
        if (r == 0) {
            r = rebuild_refcounts(&c);
        }
        if (r == 0) {
            res->rebuilt = true;
            res->corruptions_fixed++;
            res->corruptions++;
        }
    }
    if (r == 0) {
        uint64_t cf = res->corruptions_fixed, cc = res->corruptions;
        res->corruptions = 0;
        r = run_pass(&c, c.refblocks_bad ? CT_FIX_NONE : fix);
        if (r == 0 && (fix & CT_FIX_ERRORS) && c.refblocks_bad) {
            say(&c, "Rebuilding refcount structure");
            r = count_refs(&c);
            if (r == 0) {
                r = rebuild_refcounts(&c);
            }
            if (r == 0) {
                res->rebuilt = true;
                res->corruptions_fixed += res->corruptions;
                c.refblocks_bad = false;
                r = run_pass(&c, fix); /* COPIED flags against the new refcounts */
            }
        }
        res->corruptions += cc;
        res->corruptions_fixed += cf;
    }
    if (r == 0 && fix && (res->leaks_fixed || res->corruptions_fixed)) {
        r = qcow2_flush_metadata(q);
        q->repair_refs = NULL;
        if (r == 0) {
            /* Double check: the counts reported are what remains after the repair. */
            struct ct_check_result again = {0};
            again.total_clusters = res->total_clusters;
            c.res = &again;
            c.report = NULL;
            r = run_pass(&c, CT_FIX_NONE);
            again.leaks_fixed = res->leaks_fixed;
            again.corruptions_fixed = res->corruptions_fixed;
            again.rebuilt = res->rebuilt;
            /* Report what was fixed plus what the double check still finds. */
            again.leaks += again.leaks_fixed;
            again.corruptions += again.corruptions_fixed;
            *res = again;
        }
    }
    q->repair_refs = NULL;
    if (r == 0 && fix == CT_FIX_ALL && (q->incompat & QCOW2_INCOMPAT_CORRUPT) &&
        res->corruptions <= res->corruptions_fixed) {
        q->incompat &= ~QCOW2_INCOMPAT_CORRUPT;
        r = qcow2_write_header_fields(q, QH_INCOMPAT, 8);
    }
    if (r == 0) {
        res->image_end_offset = refs_end(&c) << q->cluster_bits;
    }
out:
    if (c.rc.pages) {
        refs_clear(&c);
    }
    free(c.rc.pages);
    free(c.rc.flat);
    map_free(&c.rc.big);
    map_free(&c.stored_diff);
    free(c.table);
    if (r < 0) {
        return ct_err_set(err, r, "check failed: %s", ct_strerror(r));
    }
    return 0;
}
