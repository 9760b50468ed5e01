/*
 * Internal snapshot table: parsing and validation. (Create/apply/delete come with the
 * snapshot work; reading is needed by open, check and info.)
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "qcow2/qcow2.h"
#include "util/bswap.h"
#include "util/err.h"
#include "util/misc.h"

int qcow2_read_snapshots(struct qcow2_state *q, struct ct_err *err)
{
    if (q->nb_snapshots == 0) {
        return 0;
    }
    if (q->nb_snapshots > QCOW2_MAX_SNAPSHOTS) {
        return ct_err_set(err, -CT_E_CORRUPT, "snapshot count %u exceeds the limit of %u",
                          q->nb_snapshots, QCOW2_MAX_SNAPSHOTS);
    }
    int64_t fsz = ct_file_size(q->file);
    if (q->snapshots_offset & (q->cluster_size - 1) || q->snapshots_offset == 0 || fsz < 0 ||
        q->snapshots_offset >= (uint64_t)fsz) {
        return ct_err_set(err, -CT_E_CORRUPT,
                          "snapshot table offset 0x%llx is invalid (unaligned or past the end "
                          "of the file)",
                          (unsigned long long)q->snapshots_offset);
    }
    q->snapshots = calloc(q->nb_snapshots, sizeof(*q->snapshots));
    if (!q->snapshots) {
        return ct_err_set(err, -ENOMEM, "out of memory");
    }
    uint64_t off = q->snapshots_offset, total = 0;
    for (uint32_t i = 0; i < q->nb_snapshots; i++) {
        struct qcow2_snapshot *s = &q->snapshots[i];
        uint8_t h[QS_FIXED_LEN];
        int r = ct_file_pread(q->file, h, sizeof(h), off);
        if (r < 0) {
            return ct_err_set(err, r, "Could not read the snapshot table: %s", ct_strerror(r));
        }
        s->l1_offset = ld_be64(h + QS_L1_OFFSET);
        s->l1_size = ld_be32(h + QS_L1_SIZE);
        uint16_t id_len = ld_be16(h + QS_ID_SIZE), name_len = ld_be16(h + QS_NAME_SIZE);
        s->date_sec = ld_be32(h + QS_DATE_SEC);
        s->date_nsec = ld_be32(h + QS_DATE_NSEC);
        s->vm_clock_nsec = ld_be64(h + QS_VM_CLOCK_NSEC);
        s->vm_state_size = ld_be32(h + QS_VM_STATE_SIZE);
        s->extra_size = ld_be32(h + QS_EXTRA_SIZE);
        if (s->extra_size > QCOW2_MAX_SNAPSHOT_EXTRA) {
            return ct_err_set(err, -CT_E_CORRUPT,
                              "snapshot %u has %u bytes of extra data (at most %u)", i,
                              s->extra_size, QCOW2_MAX_SNAPSHOT_EXTRA);
        }
        uint64_t len = QS_FIXED_LEN + s->extra_size + id_len + name_len;
        total += ct_align_up(len, 8);
        if (total > QCOW2_MAX_SNAPSHOT_TABLE_BYTES || off + len > (uint64_t)fsz) {
            return ct_err_set(err, -CT_E_CORRUPT,
                              "snapshot table is larger than 64 MiB or runs past the end of "
                              "the file");
        }
        uint8_t *rest = malloc(len - QS_FIXED_LEN + 1);
        if (!rest) {
            return ct_err_set(err, -ENOMEM, "out of memory");
        }
        r = ct_file_pread(q->file, rest, len - QS_FIXED_LEN, off + QS_FIXED_LEN);
        if (r < 0) {
            free(rest);
            return ct_err_set(err, r, "Could not read the snapshot table: %s", ct_strerror(r));
        }
        s->extra = malloc(s->extra_size ? s->extra_size : 1);
        s->id = strndup((char *)rest + s->extra_size, id_len);
        s->name = strndup((char *)rest + s->extra_size + id_len, name_len);
        if (!s->extra || !s->id || !s->name) {
            free(rest);
            return ct_err_set(err, -ENOMEM, "out of memory");
        }
        memcpy(s->extra, rest, s->extra_size);
        if (s->extra_size >= 8) {
            s->vm_state_size = ld_be64(rest + QS_EXTRA_VM_STATE_SIZE);
        }
        s->disk_size = q->img->size;
        if (s->extra_size >= 16) {
            s->disk_size = ld_be64(rest + QS_EXTRA_DISK_SIZE);
        }
        s->icount = UINT64_MAX;
        if (s->extra_size >= 24) {
            s->icount = ld_be64(rest + QS_EXTRA_ICOUNT);
        }
        free(rest);
        if ((uint64_t)s->l1_size * 8 > QCOW2_MAX_L1_BYTES) {
            return ct_err_set(err, -CT_E_CORRUPT,
                              "snapshot '%s' has an L1 table of %u entries, "
                              "too large",
                              s->name, s->l1_size);
        }
        if (s->l1_size && ((s->l1_offset & (q->cluster_size - 1)) || s->l1_offset == 0 ||
                           s->l1_offset + (uint64_t)s->l1_size * 8 > (uint64_t)fsz)) {
            return ct_err_set(err, -CT_E_CORRUPT,
                              "snapshot '%s' L1 table (offset 0x%llx) is unaligned or past the "
                              "end of the file",
                              s->name, (unsigned long long)s->l1_offset);
        }
        off += ct_align_up(len, 8);
    }
    q->snapshots_bytes = off - q->snapshots_offset;
    return 0;
}

/* ---- snapshot operations ----
 *
 * Ordering (crash safety; see Q2-Q5 in qcow2.h):
 *  create: refcount increments for everything the active L1 reaches and the cleared COPIED
 *          flags are written, then the snapshot's L1 copy, then the new snapshot table, then
 *          the header that names the table. A crash before the header write leaves leaks.
 *  delete: the new table without the entry and the header go first; the references the
 *          snapshot held are dropped afterwards (pending frees), so a crash leaves leaks.
 *  apply:  increments for the snapshot's tables, a new active L1, the header switch to it;
 *          then the old active state's references are dropped.
 * After delete and apply, COPIED flags of the active tables are set again where refcounts
 * dropped to 1. Between the refcount change and that flag update a crash leaves flags that
 * qemu-img check reports (as it does for QEMU's own snapshots); the dirty bit makes the next
 * read-write open repair them.
 */

static size_t entry_size(const struct qcow2_snapshot *s)
{
    uint32_t extra = s->extra_size < 24 ? 24 : s->extra_size;
    return ct_align_up(QS_FIXED_LEN + extra + strlen(s->id) + strlen(s->name), 8);
}

static uint64_t table_size(const struct qcow2_snapshot *s, uint32_t n)
{
    uint64_t t = 0;
    for (uint32_t i = 0; i < n; i++) {
        t += entry_size(&s[i]);
    }
    return t;
}

static void serialize(const struct qcow2_snapshot *s, uint8_t *p)
{
    uint32_t extra = s->extra_size < 24 ? 24 : s->extra_size;
    size_t idl = strlen(s->id), nl = strlen(s->name);
    memset(p, 0, entry_size(s));
    st_be64(p + QS_L1_OFFSET, s->l1_offset);
    st_be32(p + QS_L1_SIZE, s->l1_size);
    st_be16(p + QS_ID_SIZE, (uint16_t)idl);
    st_be16(p + QS_NAME_SIZE, (uint16_t)nl);
    st_be32(p + QS_DATE_SEC, s->date_sec);
    st_be32(p + QS_DATE_NSEC, s->date_nsec);
    st_be64(p + QS_VM_CLOCK_NSEC, s->vm_clock_nsec);
    st_be32(p + QS_VM_STATE_SIZE, (uint32_t)s->vm_state_size);
    st_be32(p + QS_EXTRA_SIZE, extra);
    uint8_t *x = p + QS_FIXED_LEN;
    if (s->extra_size > 24) {
        memcpy(x, s->extra, s->extra_size); /* unknown extra data is preserved */
    }
    st_be64(x + QS_EXTRA_VM_STATE_SIZE, s->vm_state_size);
    st_be64(x + QS_EXTRA_DISK_SIZE, s->disk_size);
    st_be64(x + QS_EXTRA_ICOUNT, s->icount);
    memcpy(x + extra, s->id, idl);
    memcpy(x + extra + idl, s->name, nl);
}

/* Write a new snapshot table for snaps[0..n) and switch the header to it (Q5). */
static int write_table(struct qcow2_state *q, struct qcow2_snapshot *snaps, uint32_t n)
{
    uint64_t len = table_size(snaps, n);
    if (len > QCOW2_MAX_SNAPSHOT_TABLE_BYTES) {
        return -EFBIG;
    }
    uint64_t off = 0;
    int r = 0;
    if (n) {
        uint64_t clusters = ct_div_round_up(len, q->cluster_size);
        uint8_t *buf = calloc(clusters, q->cluster_size);
        if (!buf) {
            return -ENOMEM;
        }
        uint8_t *p = buf;
        for (uint32_t i = 0; i < n; i++) {
            serialize(&snaps[i], p);
            p += entry_size(&snaps[i]);
        }
        r = qcow2_alloc_clusters(q, clusters, &off);
        if (r == 0) {
            r = qcow2_meta_add(q, off, len, QCOW2_META_SNAPTABLE);
        }
        if (r == 0) {
            r = qcow2_cache_flush(&q->rb_cache);
        }
        if (r == 0) {
            r = ct_file_pwrite(q->file, buf, len, off);
            q->unsynced = true;
        }
        free(buf);
        if (r == 0) {
            r = qcow2_barrier(q);
        }
        if (r < 0) {
            return image_poison(q->img, r);
        }
    }
    uint64_t old_off = q->snapshots_offset;
    uint64_t old_len = q->snapshots_bytes; /* as on disk: older tables have shorter entries */
    uint32_t old_n = q->nb_snapshots;
    q->nb_snapshots = n;
    q->snapshots_offset = off;
    uint64_t old_bytes = q->snapshots_bytes;
    q->snapshots_bytes = len;
    r = qcow2_write_header_fields(q, QH_NB_SNAPSHOTS, 12);
    if (r == 0) {
        r = qcow2_barrier(q);
    }
    if (r < 0) {
        q->nb_snapshots = old_n;
        q->snapshots_offset = old_off;
        q->snapshots_bytes = old_bytes;
        return image_poison(q->img, r);
    }
    return old_n ? qcow2_free_later(q, old_off, old_len) : 0;
}

static int load_l1(struct qcow2_state *q, uint64_t off, uint32_t size, uint64_t **out)
{
    uint64_t *t = calloc(size ? size : 1, 8);
    if (!t) {
        return -ENOMEM;
    }
    int r = ct_file_pread(q->file, t, (uint64_t)size * 8, off);
    if (r < 0) {
        free(t);
        return r;
    }
    for (uint32_t i = 0; i < size; i++) {
        t[i] = be64toh(t[i]);
    }
    *out = t;
    return 0;
}

/*
 * Add delta (+1 now, or -1 through the pending-free list) to the refcount of every L2 table
 * and data cluster an L1 table reaches. With check_only, verify that +1 would not overflow.
 * clear_copied: clear COPIED in the L2 entries (they become shared).
 */
static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Would adding one reference per mention overflow any refcount? A cluster may be mentioned
 * several times (compressed clusters share host clusters), so mentions are counted. */
static int check_room(struct qcow2_state *q, const uint64_t *l1, uint32_t l1_size)
{
    size_t n = 0, cap = 1024;
    uint64_t *v = malloc(cap * sizeof(*v));
    int r = v ? 0 : -ENOMEM;
    for (uint32_t i = 0; r == 0 && i < l1_size; i++) {
        uint64_t l2off = l1[i] & QCOW2_L1E_OFFSET_MASK;
        if (!l2off) {
            continue;
        }
        struct qcow2_cache_entry *e = NULL;
        r = qcow2_cache_get(&q->l2_cache, l2off, false, &e);
        if (r < 0) {
            break;
        }
        for (uint64_t j = 0; r == 0 && j <= q->l2_entries; j++) {
            uint64_t off = l2off, len = q->cluster_size;
            if (j < q->l2_entries) {
                uint64_t l2e = ld_be64(e->table + j * q->l2_entry_bytes);
                len = 0;
                if (l2e & QCOW2_OFLAG_COMPRESSED) {
                    qcow2_compressed_range(q, l2e, &off, &len);
                } else if (l2e & QCOW2_L2E_OFFSET_MASK) {
                    off = l2e & QCOW2_L2E_OFFSET_MASK;
                    len = q->cluster_size;
                }
            }
            for (uint64_t c = off >> q->cluster_bits;
                 len && c <= (off + len - 1) >> q->cluster_bits; c++) {
                if (n == cap) {
                    uint64_t *nv = realloc(v, cap * 2 * sizeof(*v));
                    if (!nv) {
                        r = -ENOMEM;
                        break;
                    }
                    v = nv;
                    cap *= 2;
                }
                v[n++] = c;
            }
        }
        qcow2_cache_put(&q->l2_cache, e);
    }
    if (r == 0) {
        qsort(v, n, sizeof(*v), cmp_u64);
        for (size_t i = 0; r == 0 && i < n;) {
            size_t k = i;
            while (k < n && v[k] == v[i]) {
                k++;
            }
            uint64_t rc;
            r = qcow2_refcount_get(q, v[i], &rc);
            if (r == 0 && rc + (k - i) > q->refcount_max) {
                r = -ERANGE;
            }
            i = k;
        }
    }
    free(v);
    return r;
}

static int adjust_refs(struct qcow2_state *q, const uint64_t *l1, uint32_t l1_size, int delta,
                       bool check_only, bool clear_copied)
{
    if (check_only) {
        return check_room(q, l1, l1_size);
    }
    for (uint32_t i = 0; i < l1_size; i++) {
        uint64_t l2off = l1[i] & QCOW2_L1E_OFFSET_MASK;
        if (!l2off) {
            continue;
        }
        if (l2off & (q->cluster_size - 1)) {
            return qcow2_corrupt(q, "L2 table offset 0x%llx is unaligned",
                                 (unsigned long long)l2off);
        }
        struct qcow2_cache_entry *e;
        int r = qcow2_cache_get(&q->l2_cache, l2off, false, &e);
        if (r < 0) {
            return r;
        }
        for (uint64_t j = 0; j < q->l2_entries && r == 0; j++) {
            uint8_t *ep = e->table + j * q->l2_entry_bytes;
            uint64_t l2e = ld_be64(ep);
            uint64_t off, len = 0;
            if (l2e & QCOW2_OFLAG_COMPRESSED) {
                qcow2_compressed_range(q, l2e, &off, &len);
            } else if (l2e & QCOW2_L2E_OFFSET_MASK) {
                off = l2e & QCOW2_L2E_OFFSET_MASK;
                len = q->cluster_size;
            }
            if (!len) {
                continue;
            }
            if (check_only) {
                for (uint64_t c = off >> q->cluster_bits;
                     c <= (off + len - 1) >> q->cluster_bits && r == 0; c++) {
                    uint64_t rc;
                    r = qcow2_refcount_get(q, c, &rc);
                    if (r == 0 && rc + 1 > q->refcount_max) {
                        r = -ERANGE;
                    }
                }
            } else if (delta > 0) {
                for (uint64_t c = off >> q->cluster_bits;
                     c <= (off + len - 1) >> q->cluster_bits && r == 0; c++) {
                    r = qcow2_refcount_update(q, c, 1);
                }
                if (r == 0 && clear_copied && (l2e & QCOW2_OFLAG_COPIED)) {
                    st_be64(ep, l2e & ~QCOW2_OFLAG_COPIED);
                    e->dirty = true;
                }
            } else {
                r = qcow2_free_later(q, off, len);
            }
        }
        qcow2_cache_put(&q->l2_cache, e);
        if (r < 0) {
            return r;
        }
        if (check_only) {
            uint64_t rc;
            r = qcow2_refcount_get(q, l2off >> q->cluster_bits, &rc);
            if (r == 0 && rc + 1 > q->refcount_max) {
                r = -ERANGE;
            }
        } else if (delta > 0) {
            r = qcow2_refcount_update(q, l2off >> q->cluster_bits, 1);
        } else {
            r = qcow2_free_later(q, l2off, q->cluster_size);
        }
        if (r < 0) {
            return r;
        }
    }
    return 0;
}

/* Set COPIED on active L1/L2 entries exactly where the refcount is 1. */
static int update_copied(struct qcow2_state *q)
{
    for (uint32_t i = 0; i < q->l1_size; i++) {
        uint64_t l1e = q->l1[i], l2off = l1e & QCOW2_L1E_OFFSET_MASK;
        if (!l2off) {
            continue;
        }
        uint64_t rc;
        int r = qcow2_refcount_get(q, l2off >> q->cluster_bits, &rc);
        if (r < 0) {
            return r;
        }
        uint64_t want = rc == 1 ? (l1e | QCOW2_OFLAG_COPIED) : (l1e & ~QCOW2_OFLAG_COPIED);
        if (want != l1e) {
            q->l1[i] = want;
            q->l1_dirty_lo = CT_MIN(q->l1_dirty_lo, i);
            q->l1_dirty_hi = CT_MAX(q->l1_dirty_hi, i + 1);
        }
        if (rc != 1) {
            continue; /* a shared table's entries stay without COPIED */
        }
        struct qcow2_cache_entry *e;
        r = qcow2_cache_get(&q->l2_cache, l2off, false, &e);
        if (r < 0) {
            return r;
        }
        for (uint64_t j = 0; j < q->l2_entries && r == 0; j++) {
            uint8_t *ep = e->table + j * q->l2_entry_bytes;
            uint64_t l2e = ld_be64(ep), host = l2e & QCOW2_L2E_OFFSET_MASK;
            if ((l2e & QCOW2_OFLAG_COMPRESSED) || !host) {
                continue;
            }
            uint64_t drc;
            r = qcow2_refcount_get(q, host >> q->cluster_bits, &drc);
            uint64_t w = drc == 1 ? (l2e | QCOW2_OFLAG_COPIED) : (l2e & ~QCOW2_OFLAG_COPIED);
            if (r == 0 && w != l2e) {
                st_be64(ep, w);
                e->dirty = true;
            }
        }
        qcow2_cache_put(&q->l2_cache, e);
        if (r < 0) {
            return r;
        }
    }
    return 0;
}

static bool is_all_digits(const char *s)
{
    if (!*s) {
        return false;
    }
    for (; *s; s++) {
        if (*s < '0' || *s > '9') {
            return false;
        }
    }
    return true;
}

int qcow2_snapshot_find(struct qcow2_state *q, const char *key, struct ct_err *err)
{
    int by_id = -1, by_name = -1, names = 0;
    for (uint32_t i = 0; i < q->nb_snapshots; i++) {
        if (strcmp(q->snapshots[i].id, key) == 0) {
            by_id = (int)i;
        }
        if (strcmp(q->snapshots[i].name, key) == 0) {
            if (names++ == 0) {
                by_name = (int)i;
            } else {
                return ct_err_set(err, -EINVAL,
                                  "snapshot name '%s' is ambiguous: it names snapshot ids %s "
                                  "and %s",
                                  key, q->snapshots[by_name].id, q->snapshots[i].id);
            }
        }
    }
    if (by_id >= 0 && by_name >= 0 && by_id != by_name) {
        return ct_err_set(err, -EINVAL,
                          "'%s' is ambiguous: it is the id of snapshot '%s' and the name of "
                          "snapshot id %s",
                          key, q->snapshots[by_id].name, q->snapshots[by_name].id);
    }
    if (by_name >= 0) {
        return by_name;
    }
    if (by_id >= 0) {
        return by_id;
    }
    return ct_err_set(err, -ENOENT, "snapshot '%s' not found", key);
}

/* Guest offset where VM state lives: the first L1 entry past the virtual disk. */
static uint64_t vmstate_offset(const struct qcow2_state *q, uint64_t disk_size)
{
    uint64_t span = q->cluster_size * q->l2_entries;
    return ct_div_round_up(disk_size, span) * span;
}

int qcow2_snapshot_create(struct qcow2_state *q, const char *name,
                          const struct ct_snapshot_create_opts *o, struct ct_err *err)
{
    struct ct_image *img = q->img;
    if (!*name) {
        return ct_err_set(err, -EINVAL, "snapshot name must not be empty");
    }
    if (strlen(name) > 65535) {
        return ct_err_set(err, -EINVAL, "snapshot name is longer than 65535 bytes");
    }
    for (uint32_t i = 0; i < q->nb_snapshots; i++) {
        if (strcmp(q->snapshots[i].name, name) == 0) {
            return ct_err_set(err, -EEXIST, "a snapshot named '%s' already exists (id %s)", name,
                              q->snapshots[i].id);
        }
        if (strcmp(q->snapshots[i].id, name) == 0) {
            return ct_err_set(err, -EEXIST,
                              "'%s' is already the id of snapshot '%s'; the name would be "
                              "ambiguous",
                              name, q->snapshots[i].name);
        }
    }
    if (q->nb_snapshots >= QCOW2_MAX_SNAPSHOTS) {
        return ct_err_set(err, -EFBIG, "the image already has the maximum of %u snapshots",
                          QCOW2_MAX_SNAPSHOTS);
    }
    if (q->refcount_max < 2) {
        return ct_err_set(err, -ERANGE,
                          "internal snapshots need refcounts of at least 2 bits (this image "
                          "has refcount_bits=%u)",
                          q->refcount_bits);
    }
    /* Refuse before changing anything (not even the dirty bit, which would also invalidate
     * persistent bitmaps): every reference must have room for one more count. */
    int r = adjust_refs(q, q->l1, q->l1_size, 1, true, false);
    if (r == -ERANGE) {
        return ct_err_set(err, r,
                          "a cluster's refcount would exceed the maximum of %llu for "
                          "refcount_bits=%u",
                          (unsigned long long)q->refcount_max, q->refcount_bits);
    }
    if (r < 0) {
        return ct_err_set(err, r, "could not read the refcounts: %s", ct_strerror(r));
    }
    r = qcow2_mark_dirty(q);
    if (r < 0) {
        return ct_err_set(err, r, "could not mark the image dirty: %s", ct_strerror(r));
    }
    uint64_t vm_len = o && o->vmstate ? o->vmstate_len : 0;
    uint64_t vm_off = vmstate_offset(q, img->size);
    if (vm_len) {
        uint64_t span = q->cluster_size * q->l2_entries;
        uint64_t need = ct_div_round_up(vm_off + vm_len, span);
        if (need * 8 > QCOW2_MAX_L1_BYTES) {
            return ct_err_set(err, -EFBIG, "the VM state is too large for this image");
        }
        r = qcow2_grow_l1(q, (uint32_t)need);
        if (r == 0) {
            r = qcow2_pwrite(img, o->vmstate, vm_len, vm_off);
        }
        if (r < 0) {
            return ct_err_set(err, r, "could not save the VM state: %s", ct_strerror(r));
        }
    }
    r = qcow2_flush_metadata(q);
    if (r == 0) {
        r = adjust_refs(q, q->l1, q->l1_size, 1, true, false);
        if (r == -ERANGE) {
            ct_err_set(err, r,
                       "a cluster's refcount would exceed the maximum of %llu for "
                       "refcount_bits=%u",
                       (unsigned long long)q->refcount_max, q->refcount_bits);
            goto drop_vmstate;
        }
    }
    if (r == 0) {
        r = adjust_refs(q, q->l1, q->l1_size, 1, false, true);
    }
    if (r < 0) {
        ct_err_set(err, r, "could not update refcounts: %s", ct_strerror(r));
        return image_poison(img, r);
    }
    /* The active tables are now shared: no COPIED flag anywhere in the active L1. */
    for (uint32_t i = 0; i < q->l1_size; i++) {
        if (q->l1[i] & QCOW2_OFLAG_COPIED) {
            q->l1[i] &= ~QCOW2_OFLAG_COPIED;
            q->l1_dirty_lo = CT_MIN(q->l1_dirty_lo, i);
            q->l1_dirty_hi = CT_MAX(q->l1_dirty_hi, i + 1);
        }
    }
    uint64_t l1_bytes = ct_align_up((uint64_t)q->l1_size * 8, q->cluster_size);
    uint64_t l1_off = 0;
    if (q->l1_size) {
        r = qcow2_alloc_clusters(q, l1_bytes >> q->cluster_bits, &l1_off);
        if (r == 0) {
            r = qcow2_meta_add(q, l1_off, l1_bytes, QCOW2_META_SNAP_L1);
        }
    }
    if (r == 0) {
        r = qcow2_flush_metadata(q);
    }
    if (r == 0 && q->l1_size) {
        uint64_t *be = calloc(1, l1_bytes);
        if (!be) {
            r = -ENOMEM;
        } else {
            for (uint32_t i = 0; i < q->l1_size; i++) {
                be[i] = htobe64(q->l1[i]);
            }
            r = ct_file_pwrite(q->file, be, l1_bytes, l1_off);
            q->unsynced = true;
            free(be);
        }
    }
    if (r < 0) {
        ct_err_set(err, r, "could not write the snapshot's L1 table: %s", ct_strerror(r));
        return image_poison(img, r);
    }
    struct qcow2_snapshot *snaps = calloc(q->nb_snapshots + 1, sizeof(*snaps));
    if (!snaps) {
        return ct_err_set(err, -ENOMEM, "out of memory");
    }
    if (q->nb_snapshots) {
        memcpy(snaps, q->snapshots, q->nb_snapshots * sizeof(*snaps));
    }
    struct qcow2_snapshot *s = &snaps[q->nb_snapshots];
    unsigned long max_id = 0;
    for (uint32_t i = 0; i < q->nb_snapshots; i++) {
        if (is_all_digits(q->snapshots[i].id)) {
            unsigned long v = strtoul(q->snapshots[i].id, NULL, 10);
            max_id = v > max_id ? v : max_id;
        }
    }
    /* The new id must not be the name of another snapshot (or of this one): such a pair
     * would make the string ambiguous; take the next free number instead. */
    char idbuf[32];
    for (unsigned long id = max_id + 1;; id++) {
        snprintf(idbuf, sizeof(idbuf), "%lu", id);
        bool taken = strcmp(idbuf, name) == 0;
        for (uint32_t i = 0; i < q->nb_snapshots && !taken; i++) {
            taken = strcmp(q->snapshots[i].name, idbuf) == 0;
        }
        if (!taken) {
            break;
        }
    }
    s->id = strdup(idbuf);
    s->name = strdup(name);
    s->l1_offset = l1_off;
    s->l1_size = q->l1_size;
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    s->date_sec = o && o->date_sec ? o->date_sec : (uint32_t)now.tv_sec;
    s->date_nsec = o && o->date_sec ? o->date_nsec : (uint32_t)now.tv_nsec;
    s->vm_clock_nsec = o ? o->vm_clock_nsec : 0;
    s->vm_state_size = vm_len;
    s->disk_size = img->size;
    s->icount = 0; /* what qemu-img writes (no record/replay) */
    s->extra_size = 24;
    s->extra = calloc(1, 24);
    if (!s->id || !s->name || !s->extra) {
        free(s->id);
        free(s->name);
        free(s->extra);
        free(snaps);
        return ct_err_set(err, -ENOMEM, "out of memory");
    }
    r = write_table(q, snaps, q->nb_snapshots + 1);
    if (r < 0) {
        free(s->id);
        free(s->name);
        free(s->extra);
        free(snaps);
        return ct_err_set(err, r, "could not write the snapshot table: %s", ct_strerror(r));
    }
    free(q->snapshots);
    q->snapshots = snaps;
    if (vm_len) {
        /* The VM state belongs to the snapshot only; drop it from the active state. */
        r = qcow2_discard_range(q, vm_off, ct_align_up(vm_len, q->cluster_size), true);
    }
    if (r == 0) {
        r = qcow2_flush_metadata(q);
    }
    return r < 0 ? ct_err_set(err, r, "snapshot created, but cleanup failed: %s", ct_strerror(r))
                 : 0;
drop_vmstate:
    if (vm_len) {
        qcow2_discard_range(q, vm_off, vm_len, true);
    }
    return err ? err->code : r;
}

int qcow2_snapshot_delete(struct qcow2_state *q, const char *key, struct ct_err *err)
{
    int idx = qcow2_snapshot_find(q, key, err);
    if (idx < 0) {
        return idx;
    }
    int r = qcow2_mark_dirty(q);
    if (r == 0) {
        r = qcow2_flush_metadata(q);
    }
    if (r < 0) {
        return ct_err_set(err, r, "could not flush the image: %s", ct_strerror(r));
    }
    struct qcow2_snapshot victim = q->snapshots[idx];
    uint32_t n = q->nb_snapshots - 1;
    struct qcow2_snapshot *snaps = calloc(n ? n : 1, sizeof(*snaps));
    if (!snaps) {
        return ct_err_set(err, -ENOMEM, "out of memory");
    }
    memcpy(snaps, q->snapshots, (size_t)idx * sizeof(*snaps));
    memcpy(snaps + idx, q->snapshots + idx + 1, (size_t)(n - (uint32_t)idx) * sizeof(*snaps));
    r = write_table(q, snaps, n);
    if (r < 0) {
        free(snaps);
        return ct_err_set(err, r, "could not write the snapshot table: %s", ct_strerror(r));
    }
    free(q->snapshots);
    q->snapshots = snaps;
    /* The snapshot is gone from the disk; now release what it referenced (Q4). */
    uint64_t *l1 = NULL;
    r = load_l1(q, victim.l1_offset, victim.l1_size, &l1);
    if (r == 0) {
        r = adjust_refs(q, l1, victim.l1_size, -1, false, false);
    }
    free(l1);
    if (r == 0 && victim.l1_size) {
        r = qcow2_free_later(q, victim.l1_offset,
                             ct_align_up((uint64_t)victim.l1_size * 8, q->cluster_size));
    }
    if (r == 0) {
        r = qcow2_flush_metadata(q);
    }
    if (r == 0) {
        r = update_copied(q);
    }
    if (r == 0) {
        r = qcow2_flush_metadata(q);
    }
    free(victim.id);
    free(victim.name);
    free(victim.extra);
    if (r < 0) {
        return ct_err_set(err, image_poison(q->img, r),
                          "snapshot removed from the table, but releasing its clusters failed "
                          "(they are leaked; 'check -r leaks' frees them): %s",
                          ct_strerror(r));
    }
    return 0;
}

int qcow2_snapshot_apply(struct qcow2_state *q, const char *key, struct ct_err *err)
{
    struct ct_image *img = q->img;
    int idx = qcow2_snapshot_find(q, key, err);
    if (idx < 0) {
        return idx;
    }
    struct qcow2_snapshot *s = &q->snapshots[idx];
    int r;
    uint64_t span = q->cluster_size * q->l2_entries;
    uint32_t need = (uint32_t)ct_div_round_up(s->disk_size, span);
    uint32_t new_size = CT_MAX(s->l1_size, need);
    uint64_t *nl1 = NULL;
    r = load_l1(q, s->l1_offset, s->l1_size, &nl1);
    if (r < 0) {
        return ct_err_set(err, r, "could not read the snapshot's L1 table: %s", ct_strerror(r));
    }
    uint64_t bytes = ct_align_up((uint64_t)new_size * 8, q->cluster_size);
    uint64_t *t = calloc(1, bytes ? bytes : 8);
    if (!t) {
        free(nl1);
        return ct_err_set(err, -ENOMEM, "out of memory");
    }
    for (uint32_t i = 0; i < s->l1_size; i++) {
        t[i] = nl1[i] & ~QCOW2_OFLAG_COPIED;
    }
    free(nl1);
    /* Refuse before changing anything (the dirty bit included). */
    r = adjust_refs(q, t, s->l1_size, 1, true, false);
    if (r == -ERANGE) {
        free(t);
        return ct_err_set(err, r, "a cluster's refcount would exceed the maximum of %llu",
                          (unsigned long long)q->refcount_max);
    }
    if (r == 0) {
        r = qcow2_mark_dirty(q);
    }
    if (r == 0) {
        r = qcow2_flush_metadata(q);
    }
    if (r == 0) {
        r = adjust_refs(q, t, s->l1_size, 1, false, false);
    }
    uint64_t off = 0;
    if (r == 0 && bytes) {
        r = qcow2_alloc_clusters(q, bytes >> q->cluster_bits, &off);
        if (r == 0) {
            r = qcow2_meta_add(q, off, bytes, QCOW2_META_L1);
        }
    }
    if (r == 0) {
        r = qcow2_flush_metadata(q);
    }
    if (r == 0 && bytes) {
        uint64_t *be = malloc(bytes);
        if (!be) {
            r = -ENOMEM;
        } else {
            for (uint64_t i = 0; i < bytes / 8; i++) {
                be[i] = htobe64(t[i]);
            }
            r = ct_file_pwrite(q->file, be, bytes, off);
            q->unsynced = true;
            free(be);
        }
    }
    if (r == 0) {
        r = qcow2_barrier(q);
    }
    if (r < 0) {
        free(t);
        ct_err_set(err, r, "could not prepare the snapshot's tables: %s", ct_strerror(r));
        return image_poison(img, r);
    }
    /* Switch: size, L1 size and L1 offset are one contiguous header range (24..47). */
    uint64_t *old_l1 = q->l1;
    uint32_t old_size = q->l1_size;
    uint64_t old_off = q->l1_offset, old_disk = img->size;
    q->l1 = t;
    q->l1_size = new_size;
    q->l1_offset = off;
    img->size = s->disk_size;
    q->l1_dirty_lo = UINT32_MAX;
    q->l1_dirty_hi = 0;
    r = qcow2_write_header_fields(q, QH_SIZE, 24);
    if (r == 0) {
        r = qcow2_barrier(q);
    }
    if (r < 0) {
        q->l1 = old_l1;
        q->l1_size = old_size;
        q->l1_offset = old_off;
        img->size = old_disk;
        free(t);
        ct_err_set(err, r, "could not switch to the snapshot: %s", ct_strerror(r));
        return image_poison(img, r);
    }
    qcow2_cache_drop_all(&q->l2_cache);
    for (uint32_t i = 0; i < q->l1_size; i++) {
        uint64_t l2 = q->l1[i] & QCOW2_L1E_OFFSET_MASK;
        if (l2) {
            qcow2_meta_add(q, l2, q->cluster_size, QCOW2_META_L2);
        }
    }
    /* Release the old active state (Q4), then restore COPIED flags. */
    r = adjust_refs(q, old_l1, old_size, -1, false, false);
    if (r == 0 && old_size) {
        r = qcow2_free_later(q, old_off, ct_align_up((uint64_t)old_size * 8, q->cluster_size));
    }
    free(old_l1);
    if (r == 0) {
        r = qcow2_flush_metadata(q);
    }
    if (r == 0) {
        r = update_copied(q);
    }
    if (r == 0) {
        r = qcow2_flush_metadata(q);
    }
    if (r < 0) {
        return ct_err_set(err, image_poison(img, r),
                          "snapshot applied, but releasing the old state failed (clusters are "
                          "leaked; 'check -r all' repairs): %s",
                          ct_strerror(r));
    }
    return 0;
}

int qcow2_snapshot_use_for_read(struct qcow2_state *q, const char *key, struct ct_err *err)
{
    int idx = qcow2_snapshot_find(q, key, err);
    if (idx < 0) {
        return idx;
    }
    const struct qcow2_snapshot *s = &q->snapshots[idx];
    uint64_t *t = NULL;
    int r = load_l1(q, s->l1_offset, s->l1_size, &t);
    if (r < 0) {
        return ct_err_set(err, r, "could not read the L1 table of snapshot '%s': %s", s->name,
                          ct_strerror(r));
    }
    uint64_t span = q->cluster_size * q->l2_entries;
    if ((uint64_t)s->l1_size * span < s->disk_size) {
        /* Entries past the snapshot's L1 read as unallocated. */
        uint32_t need = (uint32_t)ct_div_round_up(s->disk_size, span);
        uint64_t *g = realloc(t, (uint64_t)need * 8);
        if (!g) {
            free(t);
            return ct_err_set(err, -ENOMEM, "out of memory");
        }
        memset(g + s->l1_size, 0, (uint64_t)(need - s->l1_size) * 8);
        t = g;
        free(q->l1);
        q->l1 = t;
        q->l1_size = need;
    } else {
        free(q->l1);
        q->l1 = t;
        q->l1_size = s->l1_size;
    }
    q->img->size = s->disk_size;
    return 0;
}

int qcow2_snapshot_read_vmstate(struct qcow2_state *q, const char *key, void *buf, uint64_t len,
                                uint64_t off, struct ct_err *err)
{
    int idx = qcow2_snapshot_find(q, key, err);
    if (idx < 0) {
        return idx;
    }
    const struct qcow2_snapshot *s = &q->snapshots[idx];
    if (off > s->vm_state_size || len > s->vm_state_size - off) {
        return ct_err_set(err, -EINVAL, "snapshot '%s' has %llu bytes of VM state", s->name,
                          (unsigned long long)s->vm_state_size);
    }
    uint64_t *t = NULL;
    int r = load_l1(q, s->l1_offset, s->l1_size, &t);
    if (r < 0) {
        return ct_err_set(err, r, "could not read the snapshot's L1 table: %s", ct_strerror(r));
    }
    /* Read through the snapshot's L1 by swapping it in for the duration of the read. */
    uint64_t *active = q->l1;
    uint32_t active_size = q->l1_size;
    q->l1 = t;
    q->l1_size = s->l1_size;
    r = qcow2_pread_raw(q, buf, len, vmstate_offset(q, s->disk_size) + off);
    q->l1 = active;
    q->l1_size = active_size;
    free(t);
    return r < 0 ? ct_err_set(err, r, "could not read the VM state: %s", ct_strerror(r)) : 0;
}

int qcow2_snapshot_diff(struct qcow2_state *q, const char *from, const char *to, qcow2_diff_fn fn,
                        void *opaque, struct ct_err *err)
{
    int ia = qcow2_snapshot_find(q, from, err);
    if (ia < 0) {
        return ia;
    }
    int ib = -1;
    if (to) {
        ib = qcow2_snapshot_find(q, to, err);
        if (ib < 0) {
            return ib;
        }
    }
    int r = q->img->writable ? qcow2_flush_metadata(q) : 0;
    const struct qcow2_snapshot *sa = &q->snapshots[ia];
    uint64_t *a = NULL, *b = NULL;
    if (r == 0) {
        r = load_l1(q, sa->l1_offset, sa->l1_size, &a);
    }
    uint32_t nb = q->l1_size;
    uint64_t size_b = q->img->size;
    if (r == 0 && ib >= 0) {
        const struct qcow2_snapshot *sb = &q->snapshots[ib];
        r = load_l1(q, sb->l1_offset, sb->l1_size, &b);
        nb = sb->l1_size;
        size_b = sb->disk_size;
    }
    if (r == 0) {
        r = qcow2_diff_l1(q, a, sa->l1_size, b ? b : q->l1, nb, sa->disk_size, size_b, fn, opaque);
    }
    free(a);
    free(b);
    return r < 0 ? ct_err_set(err, r, "diff failed: %s", ct_strerror(r)) : 0;
}

int qcow2_snapshot_rewrite_table(struct qcow2_state *q)
{
    struct qcow2_snapshot *copy = malloc(q->nb_snapshots * sizeof(*copy));
    if (!copy) {
        return -ENOMEM;
    }
    memcpy(copy, q->snapshots, q->nb_snapshots * sizeof(*copy));
    int r = write_table(q, copy, q->nb_snapshots);
    if (r < 0) {
        free(copy);
        return r;
    }
    free(q->snapshots);
    q->snapshots = copy;
    return qcow2_flush_metadata(q);
}
