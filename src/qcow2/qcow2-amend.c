/*
 * amend: change the compatibility level (0.10 <-> 1.1) and the lazy-refcounts bit in place.
 * Upgrading rewrites the snapshot table (v3 needs 16 bytes of extra data per entry) and then
 * the header. Downgrading needs what v2 can express: no extended L2, zlib, 16-bit refcounts,
 * and no zero-flag clusters; zero clusters of the active state are expanded first (to
 * unallocated when nothing lies below, else to zero-filled clusters), and a snapshot holding
 * zero clusters makes the downgrade fail with an error saying so.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2/qcow2.h"
#include "util/bswap.h"
#include "util/err.h"
#include "util/misc.h"

static int l1_has_zero_clusters(struct qcow2_state *q, uint64_t l1_off, uint32_t l1_size,
                                bool *found)
{
    uint64_t *l1 = malloc((uint64_t)l1_size * 8 + 8);
    uint8_t *t = malloc(q->cluster_size);
    int r = l1 && t ? ct_file_pread(q->file, l1, (uint64_t)l1_size * 8, l1_off) : -ENOMEM;
    for (uint32_t i = 0; r == 0 && i < l1_size && !*found; i++) {
        uint64_t l2 = be64toh(l1[i]) & QCOW2_L1E_OFFSET_MASK;
        if (!l2) {
            continue;
        }
        r = ct_file_pread(q->file, t, q->cluster_size, l2);
        for (uint64_t j = 0; r == 0 && j < q->l2_entries; j++) {
            uint64_t e = ld_be64(t + j * 8);
            if (!(e & QCOW2_OFLAG_COMPRESSED) && (e & QCOW2_OFLAG_ZERO)) {
                *found = true;
                break;
            }
        }
    }
    free(l1);
    free(t);
    return r;
}

/* Replace zero-flag clusters of the active state by what v2 can say. */
static int expand_zero_clusters(struct qcow2_state *q)
{
    struct ct_image *img = q->img;
    uint64_t span = q->cluster_size * q->l2_entries;
    for (uint64_t off = 0; off < (uint64_t)q->l1_size * span; off += q->cluster_size) {
        if (off >= img->size) {
            break;
        }
        struct qcow2_status st;
        int r = qcow2_get_status(q, off, q->cluster_size, &st);
        if (r < 0) {
            return r;
        }
        if (st.kind != QK_ZERO) {
            if (st.len > q->cluster_size) {
                off += ct_align_down(st.len, q->cluster_size) - q->cluster_size;
            }
            continue;
        }
        uint64_t n = CT_MIN(q->cluster_size, img->size - off);
        if (image_below_is_zero(img, n, off)) {
            r = qcow2_discard_range(q, off, q->cluster_size, true);
        } else {
            /* Make the cluster ordinary data full of zeros. */
            uint8_t *z = calloc(1, q->cluster_size);
            if (!z) {
                return -ENOMEM;
            }
            r = qcow2_discard_range(q, off, q->cluster_size, true);
            if (r == 0) {
                r = qcow2_pwrite(img, z, n, off);
            }
            free(z);
        }
        if (r < 0) {
            return r;
        }
    }
    return qcow2_flush_metadata(q);
}

int qcow2_amend(struct qcow2_state *q, int compat, int lazy, struct ct_err *err)
{
    int r = qcow2_mark_dirty(q);
    if (r == 0) {
        r = qcow2_flush_metadata(q);
    }
    if (r < 0) {
        return ct_err_set(err, r, "could not flush the image: %s", ct_strerror(r));
    }
    int version = compat ? compat : q->version;
    if (lazy > 0 && version < 3) {
        return ct_err_set(err, -EINVAL,
                          "Lazy refcounts only supported with compatibility level 1.1 and above "
                          "(use compat=1.1 or greater)");
    }
    if (version == 2 && q->version == 3) {
        if (q->ext_l2) {
            return ct_err_set(err, -CT_E_UNSUPPORTED,
                              "Cannot downgrade an image with extended L2 entries to compat=0.10");
        }
        if (q->compression_type != 0) {
            return ct_err_set(err, -CT_E_UNSUPPORTED,
                              "Cannot downgrade an image with compression type zstd to "
                              "compat=0.10");
        }
        if (q->refcount_bits != 16) {
            return ct_err_set(err, -CT_E_UNSUPPORTED,
                              "Cannot downgrade an image with refcount_bits=%u (compat=0.10 "
                              "needs 16)",
                              q->refcount_bits);
        }
        for (uint32_t i = 0; i < q->nb_snapshots; i++) {
            bool zero = false;
            r = l1_has_zero_clusters(q, q->snapshots[i].l1_offset, q->snapshots[i].l1_size, &zero);
            if (r == 0 && zero) {
                return ct_err_set(err, -CT_E_UNSUPPORTED,
                                  "snapshot '%s' holds zero clusters, which compat=0.10 cannot "
                                  "express; delete it or keep compat=1.1",
                                  q->snapshots[i].name);
            }
        }
        r = expand_zero_clusters(q);
        if (r < 0) {
            return ct_err_set(err, r, "could not expand zero clusters: %s", ct_strerror(r));
        }
    }
    uint64_t compat_bits = q->compat;
    if (lazy >= 0) {
        compat_bits = lazy ? (compat_bits | QCOW2_COMPAT_LAZY_REFCOUNTS)
                           : (compat_bits & ~QCOW2_COMPAT_LAZY_REFCOUNTS);
    }
    if (version == q->version) {
        q->compat = compat_bits;
        r = q->version >= 3 ? qcow2_write_header_fields(q, QH_COMPAT, 8) : 0;
        return r < 0 ? ct_err_set(err, r, "could not write the header: %s", ct_strerror(r))
                     : qcow2_barrier(q);
    }
    /* v3 snapshot entries need >= 16 bytes of extra data; cowtree always writes 24. */
    if (q->nb_snapshots) {
        r = qcow2_snapshot_rewrite_table(q);
        if (r < 0) {
            return ct_err_set(err, r, "could not rewrite the snapshot table: %s", ct_strerror(r));
        }
    }
    int old_version = q->version;
    q->version = version;
    if (version == 3) {
        q->header_length = QH_V3_LENGTH;
        q->compat = compat_bits;
        q->incompat = QCOW2_INCOMPAT_DIRTY; /* we are open for writing (Q6) */
        q->autoclear = 0;
        q->dirty_on_disk = true;
    } else {
        q->header_length = QH_V2_LENGTH;
        q->compat = q->incompat = q->autoclear = 0;
        q->dirty_on_disk = false;
        free(q->header_extra);
        q->header_extra = NULL;
    }
    r = qcow2_rewrite_header(q);
    if (r == 0) {
        r = qcow2_barrier(q);
    }
    if (r < 0) {
        q->version = old_version;
        return ct_err_set(err, r, "could not rewrite the header: %s", ct_strerror(r));
    }
    return 0;
}
