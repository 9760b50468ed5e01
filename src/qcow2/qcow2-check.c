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

struct check {
    struct qcow2_state *q;
    uint32_t *refs;
    uint64_t nclusters;
    struct ct_check_result *res;
    ct_check_report_fn report;
    void *opaque;
    uint64_t file_size;
    uint8_t *table;     /* one cluster, scratch */
    bool refblocks_bad; /* a refcount block is unusable: rebuild instead of patching */
};

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
        if (c->refs[k] < UINT32_MAX) {
            c->refs[k]++;
        }
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
    memset(c->refs, 0, c->nclusters * sizeof(*c->refs));
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
        if (rb && rb < c->nclusters && c->refs[rb] > 1) {
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
            if (c->refs[j]) {
                say(c, "ERROR refcount block %" PRIu64 " is missing for cluster %" PRIu64, rt, j);
                c->res->corruptions++;
                c->refblocks_bad = true;
                break;
            }
        }
    }
    return 0;
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
            if (c->refs[first + k]) {
                c->refs[first + k]--;
            }
        }
        for (uint64_t i = 0; i < q->reftable_entries; i++) {
            uint64_t rb = (q->reftable[i] & QCOW2_REFT_OFFSET_MASK) >> q->cluster_bits;
            if (rb && rb < c->nclusters && c->refs[rb]) {
                c->refs[rb]--;
            }
        }
    }
    uint64_t end = 1;
    for (uint64_t k = 0; k < c->nclusters; k++) {
        if (c->refs[k]) {
            end = k + 1;
            if (c->refs[k] > q->refcount_max) {
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
            uint64_t cl = b * epb + k, v = cl < c->nclusters ? c->refs[cl] : 0;
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

/* Compare counted references with stored refcounts; fix according to `fix`. */
static int compare_refs(struct check *c, unsigned fix)
{
    struct qcow2_state *q = c->q;
    uint64_t n = CT_MAX(c->nclusters, q->reftable_entries * q->refblock_entries);
    n = CT_MIN(n, c->nclusters + q->refblock_entries * 4);
    for (uint64_t k = 0; k < n; k++) {
        uint64_t rc;
        if (qcow2_refcount_get(q, k, &rc) < 0) {
            c->res->check_errors++;
            continue;
        }
        uint64_t want = k < c->nclusters ? c->refs[k] : 0;
        if (rc == want) {
            continue;
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
    c.refs = calloc(c.nclusters, sizeof(*c.refs));
    c.table = malloc(q->cluster_size);
    if (!c.refs || !c.table) {
        free(c.refs);
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
        q->repair_refs = c.refs;
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
        uint64_t hi = 0;
        for (uint64_t k = 0; k < c.nclusters; k++) {
            if (c.refs[k]) {
                hi = k + 1;
            }
        }
        res->image_end_offset = hi << q->cluster_bits;
    }
out:
    free(c.refs);
    free(c.table);
    if (r < 0) {
        return ct_err_set(err, r, "check failed: %s", ct_strerror(r));
    }
    return 0;
}
