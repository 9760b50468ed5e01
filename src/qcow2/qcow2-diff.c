/*
 * Changed-extent computation between two states of one image (two snapshots, or a snapshot
 * and the active state), from metadata alone: L1 entries naming the same L2 table cover
 * identical ranges and are skipped without reading anything; other L2 tables are compared
 * entry by entry. No guest data is read, so the cost is proportional to the L2 tables that
 * differ. The result is conservative: every byte whose content differs lies in a reported
 * extent; an extent may also cover bytes that happen to be equal (e.g. the same data written
 * twice to different clusters).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2/qcow2.h"
#include "util/bswap.h"
#include "util/err.h"
#include "util/misc.h"

struct diff_state {
    struct qcow2_state *q;
    qcow2_diff_fn fn;
    void *opaque;
    uint64_t run_off, run_len;
    uint64_t limit;
};

static int emit(struct diff_state *d, uint64_t off, uint64_t len)
{
    if (off >= d->limit) {
        return 0;
    }
    len = CT_MIN(len, d->limit - off);
    if (d->run_len && d->run_off + d->run_len == off) {
        d->run_len += len;
        return 0;
    }
    if (d->run_len) {
        int r = d->fn(d->opaque, d->run_off, d->run_len);
        if (r < 0) {
            return r;
        }
    }
    d->run_off = off;
    d->run_len = len;
    return 0;
}

/* A normalised description of what one allocation unit reads as. */
struct unit_view {
    int kind; /* 0 backing/unallocated, 1 zero, 2 data, 3 compressed */
    uint64_t where;
};

static struct unit_view view(const struct qcow2_state *q, uint64_t l2e, uint64_t bm, unsigned sc)
{
    struct unit_view v = {0, 0};
    bool no_backing = q->img->backing_name == NULL;
    if (l2e & QCOW2_OFLAG_COMPRESSED) {
        v.kind = 3;
        v.where = l2e & ~QCOW2_OFLAG_COPIED;
        return v;
    }
    uint64_t host = l2e & QCOW2_L2E_OFFSET_MASK;
    if (!q->ext_l2) {
        if (l2e & QCOW2_OFLAG_ZERO) {
            v.kind = 1;
        } else if (host) {
            v.kind = 2;
            v.where = host;
        }
    } else if ((bm >> (32 + sc)) & 1) {
        v.kind = 1;
    } else if ((bm >> sc) & 1) {
        v.kind = 2;
        v.where = host + sc * q->subcluster_size;
    }
    if (v.kind == 0 && no_backing) {
        v.kind = 1; /* unallocated without a backing file reads as zero */
    }
    return v;
}

static int compare_tables(struct diff_state *d, uint64_t base, const uint8_t *ta, const uint8_t *tb)
{
    struct qcow2_state *q = d->q;
    unsigned units = q->ext_l2 ? QCOW2_SUBCLUSTERS : 1;
    for (uint64_t j = 0; j < q->l2_entries; j++) {
        uint64_t ea = ta ? ld_be64(ta + j * q->l2_entry_bytes) : 0;
        uint64_t eb = tb ? ld_be64(tb + j * q->l2_entry_bytes) : 0;
        uint64_t ba = ta && q->ext_l2 ? ld_be64(ta + j * q->l2_entry_bytes + 8) : 0;
        uint64_t bb = tb && q->ext_l2 ? ld_be64(tb + j * q->l2_entry_bytes + 8) : 0;
        if (((ea ^ eb) & ~QCOW2_OFLAG_COPIED) == 0 && ba == bb) {
            continue;
        }
        for (unsigned sc = 0; sc < units; sc++) {
            struct unit_view va = view(q, ea, ba, sc), vb = view(q, eb, bb, sc);
            if (va.kind != vb.kind || va.where != vb.where) {
                int r = emit(d, base + j * q->cluster_size + sc * q->subcluster_size,
                             q->subcluster_size);
                if (r < 0) {
                    return r;
                }
            }
        }
    }
    return 0;
}

int qcow2_diff_l1(struct qcow2_state *q, const uint64_t *a, uint32_t na, const uint64_t *b,
                  uint32_t nb, uint64_t size_a, uint64_t size_b, qcow2_diff_fn fn, void *opaque)
{
    struct diff_state d = {.q = q, .fn = fn, .opaque = opaque};
    uint64_t span = q->cluster_size * q->l2_entries;
    uint64_t common = CT_MIN(size_a, size_b);
    d.limit = common;
    uint32_t n = (uint32_t)ct_div_round_up(common, span);
    uint8_t *tb = malloc(q->cluster_size);
    uint8_t *ta = malloc(q->cluster_size);
    int r = ta && tb ? 0 : -ENOMEM;
    for (uint32_t i = 0; r == 0 && i < n; i++) {
        uint64_t la = i < na ? a[i] & QCOW2_L1E_OFFSET_MASK : 0;
        uint64_t lb = i < nb ? b[i] & QCOW2_L1E_OFFSET_MASK : 0;
        if (la == lb) {
            continue; /* same table (or both absent): identical range */
        }
        if (la) {
            r = ct_file_pread(q->file, ta, q->cluster_size, la);
        }
        if (r == 0 && lb) {
            r = ct_file_pread(q->file, tb, q->cluster_size, lb);
        }
        if (r == 0) {
            r = compare_tables(&d, (uint64_t)i * span, la ? ta : NULL, lb ? tb : NULL);
        }
    }
    free(ta);
    free(tb);
    if (r == 0 && size_a != size_b) {
        /* Past the smaller size one side has no content at all. */
        d.limit = CT_MAX(size_a, size_b);
        r = emit(&d, common, d.limit - common);
    }
    if (r == 0 && d.run_len) {
        r = fn(opaque, d.run_off, d.run_len);
    }
    return r;
}
