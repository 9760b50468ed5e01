/*
 * Image creation. A minimal valid image is written first (header, a one-cluster refcount
 * table, one refcount block, an empty L1), then opened with the engine, which writes the
 * extensions and backing link and grows the L1 table to the requested size, exactly like a
 * resize. So creation shares the crash-safe paths instead of duplicating layout code.
 *
 * Until the image is complete nobody uses the file and the caller has not been told it
 * exists, so the ordering barriers of those paths buy nothing there: they are skipped
 * (CT_OPEN_NO_FLUSH): one flush makes the whole image durable, then the close clears the
 * dirty bit. A crash (or power loss) during creation can leave an unusable file, never a usable
 * one with wrong content; a kill -9 leaves exactly what it left with the barriers.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2/qcow2.h"
#include "util/bswap.h"
#include "util/err.h"
#include "util/misc.h"

static int write_minimal(struct ct_file *f, const struct ct_create_opts *o, unsigned cbits,
                         unsigned order)
{
    uint64_t cs = 1ull << cbits;
    uint8_t *buf = calloc(3, cs);
    if (!buf) {
        return -ENOMEM;
    }
    int version = o->compat == 2 ? 2 : 3;
    st_be32(buf + QH_MAGIC, QCOW2_MAGIC);
    st_be32(buf + QH_VERSION, (uint32_t)version);
    st_be32(buf + QH_CLUSTER_BITS, cbits);
    st_be64(buf + QH_REFTABLE_OFFSET, cs);
    st_be32(buf + QH_REFTABLE_CLUSTERS, 1);
    if (version == 3) {
        uint64_t incompat = 0;
        if (o->extended_l2) {
            incompat |= QCOW2_INCOMPAT_EXTL2;
        }
        if (o->compression_type) {
            incompat |= QCOW2_INCOMPAT_COMPRESSION;
        }
        st_be64(buf + QH_INCOMPAT, incompat);
        st_be64(buf + QH_COMPAT, o->lazy_refcounts ? QCOW2_COMPAT_LAZY_REFCOUNTS : 0);
        st_be32(buf + QH_REFCOUNT_ORDER, order);
        st_be32(buf + QH_HEADER_LENGTH, QH_V3_LENGTH);
        buf[QH_COMPRESSION_TYPE] = (uint8_t)o->compression_type;
    }
    st_be64(buf + QH_L1_OFFSET, 0);
    /* Refcount table → block at cluster 2; clusters 0-2 have refcount 1. */
    st_be64(buf + cs, 2 * cs);
    uint8_t *rb = buf + 2 * cs;
    unsigned bits = 1u << order;
    for (unsigned k = 0; k < 3; k++) {
        uint64_t bit = (uint64_t)k * bits;
        if (bits >= 8) {
            rb[bit / 8 + bits / 8 - 1] = 1; /* big-endian 1 */
        } else {
            rb[bit / 8] |= (uint8_t)(1u << (bit % 8));
        }
    }
    int r = ct_file_pwrite(f, buf, 3 * cs, 0);
    free(buf);
    return r;
}

int qcow2_create(const char *path, const struct ct_create_opts *o, uint64_t size,
                 struct ct_err *err)
{
    unsigned cs = o->cluster_size ? o->cluster_size : 65536;
    if (cs < 512 || cs > (2u << 20) || (cs & (cs - 1))) {
        return ct_err_set(err, -EINVAL,
                          "Cluster size must be a power of two between 512 and 2048k");
    }
    unsigned cbits = (unsigned)__builtin_ctz(cs);
    int compat = o->compat ? o->compat : 3;
    unsigned rbits = o->refcount_bits ? o->refcount_bits : 16;
    if (rbits > 64 || (rbits & (rbits - 1))) {
        return ct_err_set(err, -EINVAL,
                          "Refcount width must be a power of two and may not exceed 64 bits");
    }
    if (compat == 2 && rbits != 16) {
        return ct_err_set(err, -EINVAL,
                          "Different refcount widths than 16 bits require compatibility level "
                          "1.1 or above (use compat=1.1 or greater)");
    }
    if (compat == 2 && o->lazy_refcounts) {
        return ct_err_set(err, -EINVAL,
                          "Lazy refcounts only supported with compatibility level 1.1 and above "
                          "(use compat=1.1 or greater)");
    }
    if (compat == 2 && (o->extended_l2 || o->compression_type)) {
        return ct_err_set(err, -EINVAL, "%s requires compatibility level 1.1 or above",
                          o->extended_l2 ? "Extended L2 entries" : "Compression type");
    }
    if (o->extended_l2 && cs < 16384) {
        return ct_err_set(err, -EINVAL,
                          "Extended L2 entries are only supported with cluster sizes of at "
                          "least 16384 bytes");
    }
    if (o->backing_file && strlen(o->backing_file) > QCOW2_MAX_BACKING_NAME) {
        return ct_err_set(err, -EINVAL, "Backing file name too long (more than 1023 bytes)");
    }
    unsigned order = (unsigned)__builtin_ctz(rbits);
    uint64_t l2_entries = cs / (o->extended_l2 ? 16 : 8);
    if (ct_div_round_up(size, (uint64_t)cs * l2_entries) * 8 > QCOW2_MAX_L1_BYTES) {
        return ct_err_set(err, -EFBIG, "Image size is too large for this cluster size");
    }

    struct ct_file *f;
    int r = ct_file_open(&f, path, CT_FILE_WRITE | CT_FILE_CREATE, err);
    if (r < 0) {
        return r;
    }
    r = ct_file_truncate(f, 0);
    if (r == 0) {
        struct ct_create_opts oo = *o;
        oo.compat = compat;
        r = write_minimal(f, &oo, cbits, order);
    }
    ct_file_close(f);
    if (r < 0) {
        return ct_err_set(err, r, "Could not write '%s': %s", path, ct_strerror(r));
    }

    struct ct_image *img;
    struct ct_open_opts oo = {.format = "qcow2",
                              .flags = CT_OPEN_WRITE | CT_OPEN_NO_BACKING | CT_OPEN_NO_FLUSH};
    r = ct_image_open(&img, path, &oo, err);
    if (r < 0) {
        return r;
    }
    struct qcow2_state *q = qstate(img);
    if (o->backing_file) {
        img->backing_name = strdup(o->backing_file);
        img->backing_format = o->backing_format ? strdup(o->backing_format) : NULL;
    }
    r = qcow2_mark_dirty(q);
    if (r == 0) {
        r = qcow2_rewrite_header(q);
    }
    if (r == 0) {
        r = ct_image_truncate(img, size, false, err);
    }
    if (r == 0 && o->prealloc != CT_PREALLOC_OFF) {
        r = qcow2_preallocate(q, o->prealloc);
        if (r < 0) {
            ct_err_set(err, r, "Could not preallocate '%s': %s", path, ct_strerror(r));
        }
    } else if (r < 0 && err && err->code == 0) {
        ct_err_set(err, r, "Could not create '%s': %s", path, ct_strerror(r));
    }
    /* Everything durable, then the close clears the dirty bit behind a barrier of its own. */
    img->file->no_flush = false;
    if (r == 0 && (r = qcow2_flush_metadata(q)) == 0) {
        /* On the file: the skipped barriers left the engine believing it is in sync. */
        r = ct_file_flush(img->file);
    }
    if (r < 0 && err && err->code == 0) {
        ct_err_set(err, r, "Could not write '%s': %s", path, ct_strerror(r));
    }
    int cr = ct_image_close(img, r < 0 ? NULL : err);
    return r < 0 ? r : cr;
}
