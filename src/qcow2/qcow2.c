/*
 * qcow2 driver: header and extensions, open/close, dirty/corrupt bits, flush ordering,
 * L1 growth and resize. See qcow2.h for the crash-ordering invariants Q1-Q6.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2/qcow2.h"
#include "util/bswap.h"
#include "util/err.h"
#include "util/misc.h"

#define DEFAULT_CACHE_BYTES (32ull << 20)

int qcow2_barrier(struct qcow2_state *q)
{
    if (!q->unsynced) {
        return 0;
    }
    int r = ct_file_flush(q->file);
    if (r < 0) {
        return image_poison(q->img, r);
    }
    q->unsynced = false;
    return 0;
}

int qcow2_corrupt(struct qcow2_state *q, const char *fmt, ...)
{
    if (!q->img->poison) {
        /* The data path returns only a code; the message waits in the handle for the caller
         * (ct_image_last_error). Libraries do not print. */
        char msg[400];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(msg, sizeof(msg), fmt, ap);
        va_end(ap);
        snprintf(q->img->poison_msg, sizeof(q->img->poison_msg),
                 "image is corrupt: %s; further access is refused", msg);
    }
    return image_poison(q->img, -CT_E_CORRUPT);
}

const char *qcow2_feature_name(struct qcow2_state *q, int type, int bit, char *buf, size_t len)
{
    for (uint32_t i = 0; q->feature_table && i + 48 <= q->feature_table_len; i += 48) {
        const uint8_t *e = q->feature_table + i;
        if (e[0] == type && e[1] == bit) {
            size_t n = strnlen((const char *)e + 2, QCOW2_FEATURE_NAME_LEN);
            snprintf(buf, len, "%.*s", (int)n, (const char *)e + 2);
            return buf;
        }
    }
    return NULL;
}

/* Serialise the fixed header (up to 112 bytes) from the in-memory state. */
static void build_header(const struct qcow2_state *q, uint8_t *h, uint64_t backing_off,
                         uint32_t backing_len)
{
    /* Only the header's own length: a v2 header's extensions start at byte 72. */
    memset(h, 0, q->version >= 3 ? QH_V3_LENGTH : QH_V2_LENGTH);
    st_be32(h + QH_MAGIC, QCOW2_MAGIC);
    st_be32(h + QH_VERSION, (uint32_t)q->version);
    st_be64(h + QH_BACKING_OFFSET, backing_off);
    st_be32(h + QH_BACKING_SIZE, backing_len);
    st_be32(h + QH_CLUSTER_BITS, q->cluster_bits);
    st_be64(h + QH_SIZE, q->img->size);
    st_be32(h + QH_L1_SIZE, q->l1_size);
    st_be64(h + QH_L1_OFFSET, q->l1_offset);
    st_be64(h + QH_REFTABLE_OFFSET, q->reftable_offset);
    st_be32(h + QH_REFTABLE_CLUSTERS, q->reftable_clusters);
    st_be32(h + QH_NB_SNAPSHOTS, q->nb_snapshots);
    st_be64(h + QH_SNAPSHOTS_OFFSET, q->snapshots_offset);
    if (q->version >= 3) {
        st_be64(h + QH_INCOMPAT, q->incompat);
        st_be64(h + QH_COMPAT, q->compat);
        st_be64(h + QH_AUTOCLEAR, q->autoclear);
        st_be32(h + QH_REFCOUNT_ORDER, q->refcount_order);
        st_be32(h + QH_HEADER_LENGTH, q->header_length);
        h[QH_COMPRESSION_TYPE] = (uint8_t)q->compression_type;
    }
}

int qcow2_write_header_fields(struct qcow2_state *q, unsigned start, unsigned len)
{
    uint8_t h[QH_V3_LENGTH];
    uint8_t cur[16];
    /* Backing offset/size are not kept in state: read them back when inside the range. */
    int r = ct_file_pread(q->file, cur, 12, QH_BACKING_OFFSET);
    if (r < 0) {
        return r;
    }
    build_header(q, h, ld_be64(cur), ld_be32(cur + 8));
    unsigned limit = q->version >= 3 ? QH_V3_LENGTH : QH_V2_LENGTH;
    if (start + len > limit) {
        return -EINVAL;
    }
    r = ct_file_pwrite(q->file, h + start, len, start);
    if (r < 0) {
        return image_poison(q->img, r);
    }
    q->unsynced = true;
    return 0;
}

static size_t ext_size(uint32_t len)
{
    return 8 + ct_align_up(len, 8);
}

static uint8_t *put_ext(uint8_t *p, uint32_t type, const void *data, uint32_t len)
{
    st_be32(p, type);
    st_be32(p + 4, len);
    if (len) {
        memcpy(p + 8, data, len);
    }
    memset(p + 8 + len, 0, ct_align_up(len, 8) - len);
    return p + ext_size(len);
}

static const struct {
    uint8_t type, bit;
    const char *name;
} known_features[] = {
    {0, QCOW2_INCOMPAT_DIRTY_BIT, "dirty bit"},
    {0, QCOW2_INCOMPAT_CORRUPT_BIT, "corrupt bit"},
    {0, QCOW2_INCOMPAT_DATA_FILE_BIT, "external data file"},
    {0, QCOW2_INCOMPAT_COMPRESSION_BIT, "compression type"},
    {0, QCOW2_INCOMPAT_EXTL2_BIT, "extended L2 entries"},
    {1, QCOW2_COMPAT_LAZY_REFCOUNTS_BIT, "lazy refcounts"},
    {2, QCOW2_AUTOCLEAR_BITMAPS_BIT, "bitmaps"},
    {2, QCOW2_AUTOCLEAR_DATA_FILE_RAW_BIT, "raw external data"},
};

int qcow2_rewrite_header(struct qcow2_state *q)
{
    struct ct_image *img = q->img;
    uint8_t *buf = calloc(1, q->cluster_size);
    if (!buf) {
        return -ENOMEM;
    }
    size_t hl = q->version >= 3 ? q->header_length : QH_V2_LENGTH;
    uint8_t *p = buf + hl;
    uint8_t *end = buf + q->cluster_size;
    int r = -EFBIG;
    size_t need = 8;
    if (img->backing_format) {
        need += ext_size((uint32_t)strlen(img->backing_format));
    }
    if (q->bitmaps_ext) {
        need += ext_size(q->bitmaps_ext_len);
    }
    for (unsigned i = 0; i < q->nexts; i++) {
        need += ext_size(q->exts[i].len);
    }
    size_t blen = img->backing_name ? strlen(img->backing_name) : 0;
    /* The feature name table is optional: left out when the first cluster is too small for
     * it, as QEMU does with 512-byte clusters. */
    bool feature_table =
        q->version >= 3 &&
        hl + need + ext_size(48 * CT_ARRAY_SIZE(known_features)) + blen <= q->cluster_size;
    if (feature_table) {
        need += ext_size(48 * CT_ARRAY_SIZE(known_features));
    }
    if (hl + need + blen > q->cluster_size) {
        goto out;
    }
    if (img->backing_format) {
        p = put_ext(p, QCOW2_EXT_BACKING_FORMAT, img->backing_format,
                    (uint32_t)strlen(img->backing_format));
    }
    if (feature_table) {
        uint8_t table[48 * CT_ARRAY_SIZE(known_features)];
        memset(table, 0, sizeof(table));
        for (size_t i = 0; i < CT_ARRAY_SIZE(known_features); i++) {
            table[i * 48] = known_features[i].type;
            table[i * 48 + 1] = known_features[i].bit;
            memcpy(table + i * 48 + 2, known_features[i].name, strlen(known_features[i].name));
        }
        p = put_ext(p, QCOW2_EXT_FEATURE_TABLE, table, sizeof(table));
    }
    if (q->bitmaps_ext) {
        p = put_ext(p, QCOW2_EXT_BITMAPS, q->bitmaps_ext, q->bitmaps_ext_len);
    }
    for (unsigned i = 0; i < q->nexts; i++) {
        p = put_ext(p, q->exts[i].type, q->exts[i].data, q->exts[i].len);
    }
    p = put_ext(p, QCOW2_EXT_END, NULL, 0);
    uint64_t boff = 0;
    if (blen) {
        boff = (uint64_t)(p - buf);
        memcpy(p, img->backing_name, blen);
        p += blen;
    }
    (void)end;
    build_header(q, buf, boff, (uint32_t)blen);
    if (q->version >= 3 && q->header_extra) {
        memcpy(buf + QH_V3_LENGTH, q->header_extra, q->header_length - QH_V3_LENGTH);
    }
    /* One write of the first cluster's used part: the header and everything it names move
     * together. Callers order it after what it points to (Q5). */
    r = ct_file_pwrite(q->file, buf, (size_t)(p - buf), 0);
    if (r < 0) {
        r = image_poison(img, r);
    } else {
        q->unsynced = true;
    }
out:
    free(buf);
    return r;
}

int qcow2_mark_dirty(struct qcow2_state *q)
{
    q->meta_changed = true;
    if (q->dirty_on_disk || q->version < 3) {
        return 0;
    }
    /* We do not maintain persistent bitmaps or unknown autoclear features: clear them, which
     * tells their owners the data is stale (qcow2 spec, autoclear features). */
    q->autoclear = 0;
    q->incompat |= QCOW2_INCOMPAT_DIRTY;
    int r = qcow2_write_header_fields(q, QH_INCOMPAT, 24);
    if (r == 0) {
        r = qcow2_barrier(q);
    }
    if (r < 0) {
        q->incompat &= ~QCOW2_INCOMPAT_DIRTY;
        return image_poison(q->img, r);
    }
    q->dirty_on_disk = true;
    return 0;
}

static int write_l1_range(struct qcow2_state *q, uint32_t lo, uint32_t hi)
{
    if (lo >= hi) {
        return 0;
    }
    uint64_t *be = malloc((hi - lo) * 8);
    if (!be) {
        return -ENOMEM;
    }
    for (uint32_t i = lo; i < hi; i++) {
        be[i - lo] = htobe64(q->l1[i]);
    }
    int r = ct_file_pwrite(q->file, be, (hi - lo) * 8, q->l1_offset + (uint64_t)lo * 8);
    free(be);
    if (r < 0) {
        return image_poison(q->img, r);
    }
    q->unsynced = true;
    return 0;
}

int qcow2_flush_metadata(struct qcow2_state *q)
{
    int r;
    for (int round = 0; round < 4; round++) {
        /* Q2: refcount blocks, barrier, then L2 tables (the cache enforces the order). */
        r = qcow2_cache_flush(&q->l2_cache);
        if (r < 0) {
            return r;
        }
        r = qcow2_cache_flush(&q->rb_cache);
        if (r == 0) {
            r = qcow2_barrier(q);
        }
        if (r < 0) {
            return r;
        }
        /* Q3: L1 entries after the L2 tables they point to. */
        if (q->l1_dirty_lo < q->l1_dirty_hi) {
            r = write_l1_range(q, q->l1_dirty_lo, q->l1_dirty_hi);
            if (r == 0) {
                r = qcow2_barrier(q);
            }
            if (r < 0) {
                return r;
            }
            q->l1_dirty_lo = UINT32_MAX;
            q->l1_dirty_hi = 0;
        }
        if (q->npending == 0) {
            return 0;
        }
        /* Q4: references are gone from the disk; now the refcounts may drop. */
        r = qcow2_apply_pending_frees(q);
        if (r < 0) {
            return r;
        }
    }
    r = qcow2_cache_flush(&q->rb_cache);
    return r < 0 ? r : qcow2_barrier(q);
}

static int qcow2_flush(struct ct_image *img)
{
    struct qcow2_state *q = qstate(img);
    int r = qcow2_flush_metadata(q);
    if (r < 0) {
        return r;
    }
    /* Data written in place set `unsynced` too, so this barrier covers it. */
    return qcow2_barrier(q);
}

int qcow2_grow_l1(struct qcow2_state *q, uint32_t min_size)
{
    if (min_size <= q->l1_size) {
        return 0;
    }
    uint64_t new_size = CT_MAX((uint64_t)min_size, (uint64_t)q->l1_size * 3 / 2);
    if (new_size * 8 > QCOW2_MAX_L1_BYTES) {
        new_size = min_size;
    }
    if (new_size * 8 > QCOW2_MAX_L1_BYTES) {
        return -EFBIG;
    }
    int r = qcow2_mark_dirty(q);
    if (r < 0) {
        return r;
    }
    /* Q3 for the new table: every L2 table it names must be on disk first. */
    r = qcow2_flush_metadata(q);
    if (r < 0) {
        return r;
    }
    uint64_t bytes = ct_align_up(new_size * 8, q->cluster_size);
    uint64_t *nl1 = calloc(1, bytes);
    if (!nl1) {
        return -ENOMEM;
    }
    memcpy(nl1, q->l1, (uint64_t)q->l1_size * 8);
    uint64_t off;
    r = qcow2_alloc_clusters(q, bytes >> q->cluster_bits, &off);
    if (r < 0) {
        free(nl1);
        return r;
    }
    uint64_t *be = malloc(bytes);
    if (!be) {
        free(nl1);
        return -ENOMEM;
    }
    for (uint64_t i = 0; i < bytes / 8; i++) {
        be[i] = htobe64(nl1[i]);
    }
    /* Q5: refcounts of the new table, the table itself, barrier, then the header. */
    r = qcow2_cache_flush(&q->rb_cache);
    if (r == 0) {
        r = ct_file_pwrite(q->file, be, bytes, off);
        q->unsynced = true;
    }
    free(be);
    if (r == 0) {
        r = qcow2_barrier(q);
    }
    if (r < 0) {
        free(nl1);
        return image_poison(q->img, r);
    }
    r = qcow2_meta_add(q, off, bytes, QCOW2_META_L1);
    if (r < 0) {
        free(nl1);
        return r;
    }
    uint64_t old_off = q->l1_offset,
             old_bytes = ct_align_up((uint64_t)q->l1_size * 8, q->cluster_size);
    free(q->l1);
    q->l1 = nl1;
    q->l1_offset = off;
    q->l1_size = (uint32_t)new_size;
    r = qcow2_write_header_fields(q, QH_L1_SIZE, 12);
    if (r == 0) {
        r = qcow2_barrier(q);
    }
    if (r < 0) {
        return image_poison(q->img, r);
    }
    return old_off ? qcow2_free_later(q, old_off, old_bytes) : 0;
}

static int qcow2_truncate(struct ct_image *img, uint64_t size, bool shrink, struct ct_err *err)
{
    struct qcow2_state *q = qstate(img);
    if (q->nb_snapshots && q->version < 3) {
        /* v2 snapshot entries have no disk size: QEMU could not apply them afterwards. */
        return ct_err_set(err, -CT_E_UNSUPPORTED, "Can't resize a v2 image which has snapshots");
    }
    if (q->nb_snapshots && size < img->size) {
        return ct_err_set(err, -CT_E_UNSUPPORTED, "Can't shrink an image with internal snapshots");
    }
    uint64_t span = q->cluster_size * q->l2_entries;
    uint64_t need = ct_div_round_up(size, span);
    if (need * 8 > QCOW2_MAX_L1_BYTES) {
        return ct_err_set(err, -EFBIG, "size %llu is too large for cluster size %llu",
                          (unsigned long long)size, (unsigned long long)q->cluster_size);
    }
    int r = qcow2_mark_dirty(q);
    if (r < 0) {
        goto fail;
    }
    if (size < img->size) {
        /* Drop whole clusters past the new end; the partial last cluster keeps its data but
         * is beyond the end, so zero it to keep a later grow reading zeros. */
        uint64_t first = ct_align_up(size, q->cluster_size);
        if (first < img->size) {
            r = qcow2_discard_range(q, first, ct_align_up(img->size, q->cluster_size) - first,
                                    true);
            if (r < 0) {
                goto fail;
            }
        }
        if (size % q->cluster_size) {
            uint64_t tail = CT_MIN(first, img->size) - size;
            if (tail) {
                r = qcow2_pwrite_zeroes(img, tail, size, 0);
                if (r < 0) {
                    goto fail;
                }
            }
        }
    } else {
        r = qcow2_grow_l1(q, (uint32_t)need);
        if (r < 0) {
            goto fail;
        }
    }
    r = qcow2_flush_metadata(q);
    if (r < 0) {
        goto fail;
    }
    uint64_t old = img->size;
    img->size = size;
    if (size > old && img->backing && img->backing->size > old) {
        /* The grown area must read as zeros, not as whatever the (larger) backing file has
         * there: zero it in this layer before the new size becomes visible. */
        uint64_t end = CT_MIN(size, img->backing->size);
        r = qcow2_pwrite_zeroes(img, end - old, old, 0);
        if (r == 0) {
            r = qcow2_flush_metadata(q);
        }
        if (r < 0) {
            img->size = old;
            goto fail;
        }
    }
    r = qcow2_write_header_fields(q, QH_SIZE, 8);
    if (r == 0) {
        r = qcow2_barrier(q);
    }
    if (r < 0) {
        img->size = old;
        goto fail;
    }
    return 0;
fail:
    return ct_err_set(err, r, "Could not resize '%s': %s", img->filename, ct_strerror(r));
}

/* ---- open ---- */

static int parse_extensions(struct qcow2_state *q, const uint8_t *hdr, uint64_t start, uint64_t end,
                            struct ct_err *err)
{
    struct ct_image *img = q->img;
    uint64_t p = start;
    bool seen_fmt = false, seen_feat = false, seen_bm = false;
    while (p + 8 <= end) {
        uint32_t type = ld_be32(hdr + p), len = ld_be32(hdr + p + 4);
        p += 8;
        if (type == QCOW2_EXT_END) {
            return 0;
        }
        if (len > end - p) {
            return ct_err_set(err, -CT_E_CORRUPT,
                              "header extension 0x%08x has length %u, running past the end of "
                              "the header area",
                              type, len);
        }
        const uint8_t *d = hdr + p;
        switch (type) {
        case QCOW2_EXT_BACKING_FORMAT:
            if (seen_fmt || len == 0 || len > 16) {
                return ct_err_set(err, -CT_E_CORRUPT,
                                  seen_fmt ? "duplicate backing format header extension"
                                           : "invalid backing format header extension (%u bytes)",
                                  len);
            }
            seen_fmt = true;
            img->backing_format = strndup((const char *)d, len);
            break;
        case QCOW2_EXT_FEATURE_TABLE:
            if (seen_feat) {
                return ct_err_set(err, -CT_E_CORRUPT, "duplicate feature name table extension");
            }
            seen_feat = true;
            q->feature_table = malloc(len ? len : 1);
            if (!q->feature_table) {
                return ct_err_set(err, -ENOMEM, "out of memory");
            }
            memcpy(q->feature_table, d, len);
            q->feature_table_len = len;
            break;
        case QCOW2_EXT_BITMAPS:
            if (seen_bm) {
                return ct_err_set(err, -CT_E_CORRUPT, "duplicate bitmaps extension");
            }
            seen_bm = true;
            q->bitmaps_ext = malloc(len ? len : 1);
            if (!q->bitmaps_ext) {
                return ct_err_set(err, -ENOMEM, "out of memory");
            }
            memcpy(q->bitmaps_ext, d, len);
            q->bitmaps_ext_len = len;
            break;
        case QCOW2_EXT_CRYPTO:
            return ct_err_set(err, -CT_E_UNSUPPORTED, "encrypted images are not supported");
        case QCOW2_EXT_DATA_FILE:
            return ct_err_set(err, -CT_E_UNSUPPORTED,
                              "external data files are not supported by cowtree");
        default: {
            struct qcow2_ext *x = realloc(q->exts, (q->nexts + 1) * sizeof(*x));
            if (!x) {
                return ct_err_set(err, -ENOMEM, "out of memory");
            }
            q->exts = x;
            x[q->nexts].type = type;
            x[q->nexts].len = len;
            x[q->nexts].data = malloc(len ? len : 1);
            if (!x[q->nexts].data) {
                return ct_err_set(err, -ENOMEM, "out of memory");
            }
            memcpy(x[q->nexts].data, d, len);
            q->nexts++;
            break;
        }
        }
        p += ct_align_up(len, 8);
    }
    return 0; /* no end marker before the backing name: tolerated, as QEMU does */
}

static int check_region(struct qcow2_state *q, const char *what, uint64_t off, uint64_t len,
                        uint64_t file_size, struct ct_err *err)
{
    if (off & (q->cluster_size - 1)) {
        return ct_err_set(err, -CT_E_CORRUPT, "%s offset 0x%llx is not aligned to a cluster", what,
                          (unsigned long long)off);
    }
    if (len && off == 0) {
        return ct_err_set(err, -CT_E_CORRUPT, "%s at offset 0 overlaps the header", what);
    }
    if (off > file_size || len > file_size - off) {
        return ct_err_set(err, -CT_E_CORRUPT,
                          "%s (offset 0x%llx, %llu bytes) lies past the end of the file "
                          "(%llu bytes)",
                          what, (unsigned long long)off, (unsigned long long)len,
                          (unsigned long long)file_size);
    }
    return 0;
}

static bool regions_overlap(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
    return alen && blen && a < b + blen && b < a + alen;
}

static void free_state(struct qcow2_state *q);

static int qcow2_open(struct ct_image *img, struct ct_err *err)
{
    struct qcow2_state *q = calloc(1, sizeof(*q));
    if (!q) {
        return ct_err_set(err, -ENOMEM, "out of memory");
    }
    img->drv_state = q;
    q->img = img;
    q->file = img->file;
    q->l1_dirty_lo = UINT32_MAX;
    const char *fn = img->filename;
    int r;
    uint8_t *hdr = NULL;

    int64_t fsz = ct_file_size(img->file);
    if (fsz < 0) {
        r = ct_err_set(err, (int)fsz, "Could not get the size of '%s'", fn);
        goto fail;
    }
    uint64_t file_size = (uint64_t)fsz;
    if (file_size < QH_V2_LENGTH) {
        r = ct_err_set(err, -CT_E_FORMAT,
                       "Image is not in qcow2 format: the file is %llu bytes, shorter than a "
                       "qcow2 header",
                       (unsigned long long)file_size);
        goto fail;
    }
    uint8_t h[QH_V3_LENGTH] = {0};
    r = ct_file_pread(img->file, h, sizeof(h), 0);
    if (r < 0) {
        ct_err_set(err, r, "Could not read the header: %s", ct_strerror(r));
        goto fail;
    }
    if (ld_be32(h + QH_MAGIC) != QCOW2_MAGIC) {
        r = ct_err_set(err, -CT_E_FORMAT, "Image is not in qcow2 format (bad magic)");
        goto fail;
    }
    q->version = (int)ld_be32(h + QH_VERSION);
    if (q->version != 2 && q->version != 3) {
        r = ct_err_set(err, -CT_E_UNSUPPORTED, "Unsupported qcow2 version %u",
                       ld_be32(h + QH_VERSION));
        goto fail;
    }
    q->cluster_bits = ld_be32(h + QH_CLUSTER_BITS);
    if (q->cluster_bits < QCOW2_MIN_CLUSTER_BITS || q->cluster_bits > QCOW2_MAX_CLUSTER_BITS) {
        r = ct_err_set(err, -CT_E_CORRUPT,
                       "Unsupported cluster size: cluster_bits %u is outside 9..21",
                       q->cluster_bits);
        goto fail;
    }
    q->cluster_size = 1ull << q->cluster_bits;
    if (q->version == 2) {
        q->header_length = QH_V2_LENGTH;
        q->refcount_order = 4;
    } else {
        if (file_size < QH_V3_MIN_LENGTH) {
            r = ct_err_set(err, -CT_E_CORRUPT,
                           "qcow2 v3 header is truncated: the file is %llu bytes",
                           (unsigned long long)file_size);
            goto fail;
        }
        q->incompat = ld_be64(h + QH_INCOMPAT);
        q->compat = ld_be64(h + QH_COMPAT);
        q->autoclear = ld_be64(h + QH_AUTOCLEAR);
        q->refcount_order = ld_be32(h + QH_REFCOUNT_ORDER);
        q->header_length = ld_be32(h + QH_HEADER_LENGTH);
        if (q->header_length < QH_V3_MIN_LENGTH || q->header_length % 8 ||
            q->header_length > q->cluster_size) {
            r = ct_err_set(err, -CT_E_CORRUPT,
                           "invalid header_length %u (must be >= 104, a multiple of 8 and at "
                           "most one cluster)",
                           q->header_length);
            goto fail;
        }
    }
    if (q->refcount_order > 6) {
        r = ct_err_set(err, -CT_E_CORRUPT,
                       "invalid refcount_order %u (at most 6: 64-bit refcounts)",
                       q->refcount_order);
        goto fail;
    }
    q->refcount_bits = 1u << q->refcount_order;
    q->refcount_max = q->refcount_bits == 64 ? UINT64_MAX : (1ull << q->refcount_bits) - 1;
    q->refblock_entries = q->cluster_size * 8 / q->refcount_bits;

    /* Whole first cluster (header, extensions, backing name) in one read. */
    uint64_t hdr_area = CT_MIN(q->cluster_size, file_size);
    hdr = calloc(1, q->cluster_size);
    if (!hdr) {
        r = ct_err_set(err, -ENOMEM, "out of memory");
        goto fail;
    }
    r = ct_file_pread(img->file, hdr, hdr_area, 0);
    if (r < 0) {
        ct_err_set(err, r, "Could not read the header: %s", ct_strerror(r));
        goto fail;
    }
    if (q->header_length > QH_V3_LENGTH) {
        q->header_extra = malloc(q->header_length - QH_V3_LENGTH);
        if (!q->header_extra) {
            r = ct_err_set(err, -ENOMEM, "out of memory");
            goto fail;
        }
        memcpy(q->header_extra, hdr + QH_V3_LENGTH, q->header_length - QH_V3_LENGTH);
    }
    if (q->header_length > QH_COMPRESSION_TYPE) {
        q->compression_type = hdr[QH_COMPRESSION_TYPE];
    }

    uint64_t boff = ld_be64(h + QH_BACKING_OFFSET);
    uint32_t blen = ld_be32(h + QH_BACKING_SIZE);
    uint64_t ext_end = q->cluster_size;
    if (boff) {
        if (blen > QCOW2_MAX_BACKING_NAME) {
            r = ct_err_set(err, -CT_E_CORRUPT,
                           "backing file name is %u bytes long (at most 1023 allowed)", blen);
            goto fail;
        }
        if (boff > q->cluster_size || blen > q->cluster_size - boff || boff + blen > file_size) {
            r = ct_err_set(err, -CT_E_CORRUPT,
                           "backing file name (offset %llu, %u bytes) lies outside the header "
                           "cluster or past the end of the file",
                           (unsigned long long)boff, blen);
            goto fail;
        }
        if (boff < q->header_length) {
            r = ct_err_set(err, -CT_E_CORRUPT, "backing file name overlaps the header");
            goto fail;
        }
        img->backing_name = strndup((const char *)hdr + boff, blen);
        if (!img->backing_name) {
            r = ct_err_set(err, -ENOMEM, "out of memory");
            goto fail;
        }
        if (strlen(img->backing_name) != blen || blen == 0) {
            r = ct_err_set(err, -CT_E_CORRUPT, "backing file name contains a NUL byte or is empty");
            goto fail;
        }
        ext_end = boff;
    }
    r = parse_extensions(q, hdr, q->header_length, ext_end, err);
    if (r < 0) {
        goto fail;
    }

    /* Feature bits. */
    uint64_t unknown = q->incompat & ~QCOW2_INCOMPAT_MASK;
    if (unknown) {
        int bit = __builtin_ctzll(unknown);
        char name[64];
        const char *n = qcow2_feature_name(q, 0, bit, name, sizeof(name));
        r = ct_err_set(err, -CT_E_UNSUPPORTED,
                       "Unsupported qcow2 feature(s): incompatible feature bit %d%s%s%s is set; "
                       "refusing to open",
                       bit, n ? " (" : "", n ? n : "", n ? ")" : "");
        goto fail;
    }
    if (q->incompat & QCOW2_INCOMPAT_DATA_FILE) {
        r = ct_err_set(err, -CT_E_UNSUPPORTED,
                       "external data files (incompatible feature bit 2) are not supported");
        goto fail;
    }
    if ((q->incompat & QCOW2_INCOMPAT_CORRUPT) && img->writable &&
        !(img->flags & CT_OPEN_ALLOW_CORRUPT)) {
        r = ct_err_set(err, -CT_E_CORRUPT,
                       "image is marked corrupt (incompatible feature bit 1); it can be opened "
                       "read-only, or repaired with 'cowtree-img check -r all'");
        goto fail;
    }
    if (!(q->incompat & QCOW2_INCOMPAT_COMPRESSION) && q->compression_type != 0) {
        r = ct_err_set(err, -CT_E_CORRUPT,
                       "compression type %d is set but the compression-type feature bit is not",
                       q->compression_type);
        goto fail;
    }
    if (q->compression_type > 1) {
        r = ct_err_set(err, -CT_E_UNSUPPORTED, "unknown compression type %d", q->compression_type);
        goto fail;
    }
    uint32_t crypt = ld_be32(h + QH_CRYPT_METHOD);
    if (crypt) {
        r = ct_err_set(err, -CT_E_UNSUPPORTED,
                       "encrypted images are not supported (crypt_method %u)", crypt);
        goto fail;
    }
    q->ext_l2 = (q->incompat & QCOW2_INCOMPAT_EXTL2) != 0;
    if (q->ext_l2 && q->cluster_bits < 14) {
        r = ct_err_set(err, -CT_E_CORRUPT,
                       "extended L2 entries need a cluster size of at least 16 KiB (have %llu)",
                       (unsigned long long)q->cluster_size);
        goto fail;
    }
    q->l2_entry_bytes = q->ext_l2 ? 16 : 8;
    q->l2_entries = q->cluster_size / q->l2_entry_bytes;
    q->subcluster_size = q->ext_l2 ? q->cluster_size / QCOW2_SUBCLUSTERS : q->cluster_size;
    q->csize_shift = 62 - (q->cluster_bits - 8);
    q->csize_mask = (1ull << (q->cluster_bits - 8)) - 1;
    q->coffset_mask = (1ull << q->csize_shift) - 1;

    /* Size and L1. */
    img->size = ld_be64(h + QH_SIZE);
    q->l1_size = ld_be32(h + QH_L1_SIZE);
    q->l1_offset = ld_be64(h + QH_L1_OFFSET);
    uint64_t span = q->cluster_size * q->l2_entries;
    if (img->size > (uint64_t)INT64_MAX ||
        ct_div_round_up(img->size, span) * 8 > QCOW2_MAX_L1_BYTES) {
        r = ct_err_set(err, -CT_E_CORRUPT, "virtual size %llu is too large for this cluster size",
                       (unsigned long long)img->size);
        goto fail;
    }
    if ((uint64_t)q->l1_size * 8 > QCOW2_MAX_L1_BYTES) {
        r = ct_err_set(err, -CT_E_CORRUPT, "L1 table is too large (%u entries; at most %u)",
                       q->l1_size, QCOW2_MAX_L1_BYTES / 8);
        goto fail;
    }
    if (q->l1_size < ct_div_round_up(img->size, span)) {
        r = ct_err_set(err, -CT_E_CORRUPT,
                       "L1 table is too small: %u entries cannot map a virtual size of %llu",
                       q->l1_size, (unsigned long long)img->size);
        goto fail;
    }
    uint64_t l1_bytes = (uint64_t)q->l1_size * 8;
    if (q->l1_size) {
        r = check_region(q, "L1 table", q->l1_offset, l1_bytes, file_size, err);
        if (r < 0) {
            goto fail;
        }
    }
    q->reftable_offset = ld_be64(h + QH_REFTABLE_OFFSET);
    q->reftable_clusters = ld_be32(h + QH_REFTABLE_CLUSTERS);
    uint64_t rt_bytes = (uint64_t)q->reftable_clusters * q->cluster_size;
    struct ct_err rt_err = {0};
    if (rt_bytes > QCOW2_MAX_REFTABLE_BYTES) {
        r = ct_err_set(&rt_err, -CT_E_CORRUPT,
                       "refcount table is too large (%u clusters; at most 8 MiB)",
                       q->reftable_clusters);
    } else if (q->reftable_clusters == 0) {
        r = ct_err_set(&rt_err, -CT_E_CORRUPT, "refcount table is empty (0 clusters)");
    } else {
        r = check_region(q, "refcount table", q->reftable_offset, rt_bytes, file_size, &rt_err);
    }
    if (r == 0 &&
        regions_overlap(q->l1_offset, q->l1_size ? l1_bytes : 0, q->reftable_offset, rt_bytes)) {
        r = ct_err_set(&rt_err, -CT_E_CORRUPT, "the L1 table and the refcount table overlap");
    }
    if (r < 0) {
        if (!(img->writable && (img->flags & CT_OPEN_ALLOW_CORRUPT))) {
            if (err) {
                *err = rt_err;
            }
            goto fail;
        }
        /* Repair open: the refcounts will be rebuilt from the references. */
        q->reftable_broken = true;
        q->reftable_clusters = 1;
        r = 0;
    }
    q->nb_snapshots = ld_be32(h + QH_NB_SNAPSHOTS);
    q->snapshots_offset = ld_be64(h + QH_SNAPSHOTS_OFFSET);

    q->l1 = calloc(q->l1_size ? q->l1_size : 1, 8);
    if (!q->l1) {
        r = ct_err_set(err, -ENOMEM, "out of memory for the L1 table");
        goto fail;
    }
    r = ct_file_pread(img->file, q->l1, l1_bytes, q->l1_offset);
    if (r < 0) {
        ct_err_set(err, r, "Could not read the L1 table: %s", ct_strerror(r));
        goto fail;
    }
    for (uint32_t i = 0; i < q->l1_size; i++) {
        q->l1[i] = be64toh(q->l1[i]);
    }
    r = qcow2_refcount_open(q, err);
    if (r < 0 && img->writable && (img->flags & CT_OPEN_ALLOW_CORRUPT)) {
        q->reftable_broken = true;
        memset(q->reftable, 0, q->reftable_entries * 8);
        r = 0;
    }
    if (r < 0) {
        goto fail;
    }
    r = qcow2_read_snapshots(q, err);
    if (r < 0) {
        goto fail;
    }
    r = qcow2_meta_build(q);
    if (r < 0) {
        ct_err_set(err, r, "out of memory");
        goto fail;
    }
    if (img->writable && !(img->flags & CT_OPEN_ALLOW_CORRUPT)) {
        if (q->meta.conflicts) {
            r = ct_err_set(err, -CT_E_CORRUPT,
                           "metadata structures overlap (%llu clusters are claimed by two "
                           "tables); the image can be opened read-only or repaired with "
                           "'cowtree-img check -r all'",
                           (unsigned long long)q->meta.conflicts);
            goto fail;
        }
        for (uint64_t i = 0; i < q->reftable_entries; i++) {
            uint64_t rb = q->reftable[i] & QCOW2_REFT_OFFSET_MASK;
            if (rb >= file_size) {
                r = ct_err_set(err, -CT_E_CORRUPT,
                               "refcount block %llu (offset 0x%llx) lies past the end of the "
                               "file; writing would use wrong refcounts (repair with "
                               "'cowtree-img check -r all')",
                               (unsigned long long)i, (unsigned long long)rb);
                goto fail;
            }
        }
    }
    if (img->snapshot) {
        if (img->writable) {
            r = ct_err_set(err, -EINVAL, "a snapshot can only be opened read-only");
            goto fail;
        }
        r = qcow2_snapshot_use_for_read(q, img->snapshot, err);
        if (r < 0) {
            goto fail;
        }
    }

    uint64_t cache_bytes = img->cache_bytes ? img->cache_bytes : DEFAULT_CACHE_BYTES;
    unsigned l2_slots = (unsigned)CT_MAX(16, CT_MIN(cache_bytes / q->cluster_size, 4096));
    unsigned rb_slots = (unsigned)CT_MAX(16, l2_slots / 4);
    if (qcow2_cache_init(&q->l2_cache, q, QCOW2_CACHE_L2, l2_slots) < 0 ||
        qcow2_cache_init(&q->rb_cache, q, QCOW2_CACHE_REFBLOCK, rb_slots) < 0) {
        r = ct_err_set(err, -ENOMEM, "out of memory for metadata caches");
        goto fail;
    }
    if (img->writable && !(img->flags & CT_OPEN_ALLOW_CORRUPT)) {
        /* An active L2 table with refcount 0 would be handed out by the allocator: such an
         * image is repaired (check -r all), not written. One lookup per L1 entry. */
        for (uint32_t i = 0; i < q->l1_size; i++) {
            uint64_t l2 = q->l1[i] & QCOW2_L1E_OFFSET_MASK, rc = 1;
            if (l2 && qcow2_refcount_get(q, l2 >> q->cluster_bits, &rc) == 0 && rc == 0) {
                r = ct_err_set(err, -CT_E_CORRUPT,
                               "the L2 table at 0x%llx (L1 index %u) has refcount 0; repair the "
                               "image with 'cowtree-img check -r all'",
                               (unsigned long long)l2, i);
                goto fail;
            }
        }
    }
    q->dirty_on_disk = (q->incompat & QCOW2_INCOMPAT_DIRTY) != 0;
    /* Start allocating after the header cluster. */
    q->free_hint = 1;
    q->host_end = file_size;
    free(hdr);
    return 0;
fail:
    free(hdr);
    free_state(q);
    img->drv_state = NULL;
    return r;
}

static void free_state(struct qcow2_state *q)
{
    qcow2_cache_destroy(&q->l2_cache);
    qcow2_cache_destroy(&q->rb_cache);
    free(q->l1);
    free(q->reftable);
    for (uint32_t i = 0; q->snapshots && i < q->nb_snapshots; i++) {
        free(q->snapshots[i].id);
        free(q->snapshots[i].name);
        free(q->snapshots[i].extra);
    }
    free(q->snapshots);
    for (unsigned i = 0; i < q->nexts; i++) {
        free(q->exts[i].data);
    }
    free(q->exts);
    free(q->feature_table);
    free(q->bitmaps_ext);
    free(q->header_extra);
    free(q->pending);
    free(q->cbuf);
    free(q->zeros);
    qcow2_meta_free(q);
    free(q->cin);
    free(q);
}

static int qcow2_post_open(struct ct_image *img, struct ct_err *err)
{
    struct qcow2_state *q = qstate(img);
    if (!img->writable || !(q->incompat & QCOW2_INCOMPAT_DIRTY) ||
        (img->flags & CT_OPEN_NO_REPAIR)) {
        return 0;
    }
    /* Q6: the previous writer did not close cleanly; refcounts may be stale. */
    struct ct_check_result res;
    int r = qcow2_check(img, CT_FIX_ALL, &res, NULL, NULL, err);
    if (r < 0) {
        ct_err_prefix(err, "repairing the image after an unclean shutdown failed: ");
        return r;
    }
    if (res.corruptions > res.corruptions_fixed) {
        return ct_err_set(err, -CT_E_CORRUPT,
                          "the image was not closed cleanly and %llu corruptions remain after "
                          "repair",
                          (unsigned long long)(res.corruptions - res.corruptions_fixed));
    }
    return 0;
}

static int qcow2_close(struct ct_image *img)
{
    struct qcow2_state *q = qstate(img);
    int r = 0;
    if (!q) {
        return 0;
    }
    if (img->writable && !img->poison) {
        r = qcow2_flush(img);
        if (r == 0 && q->dirty_on_disk) {
            q->incompat &= ~QCOW2_INCOMPAT_DIRTY;
            r = qcow2_write_header_fields(q, QH_INCOMPAT, 8);
            if (r == 0) {
                r = qcow2_barrier(q);
            }
        }
    }
    free_state(q);
    img->drv_state = NULL;
    return r;
}

static int qcow2_info(struct ct_image *img, struct ct_image_info *info)
{
    struct qcow2_state *q = qstate(img);
    info->cluster_size = (unsigned)q->cluster_size;
    info->version = q->version;
    info->refcount_bits = q->refcount_bits;
    info->lazy_refcounts = (q->compat & QCOW2_COMPAT_LAZY_REFCOUNTS) != 0;
    info->extended_l2 = q->ext_l2;
    info->corrupt = (q->incompat & QCOW2_INCOMPAT_CORRUPT) != 0;
    info->dirty = (q->incompat & QCOW2_INCOMPAT_DIRTY) != 0;
    info->compression_type = q->compression_type;
    info->nb_snapshots = q->nb_snapshots;
    return 0;
}

const struct ct_driver ct_qcow2_driver = {
    .name = "qcow2",
    .open = qcow2_open,
    .post_open = qcow2_post_open,
    .close = qcow2_close,
    .pread = qcow2_pread,
    .pwrite = qcow2_pwrite,
    .pwrite_zeroes = qcow2_pwrite_zeroes,
    .discard = qcow2_discard,
    .flush = qcow2_flush,
    .block_status = qcow2_block_status,
    .direct_data = true,
    .truncate = qcow2_truncate,
    .info = qcow2_info,
    .check = qcow2_check,
};
