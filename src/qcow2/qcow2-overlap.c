/*
 * Metadata overlap guard. Every host cluster that holds metadata (header, L1 table, refcount
 * table and blocks, snapshot table and snapshot L1 tables, active L2 tables) is recorded with
 * its role in a hash set. Guest data is never written to such a cluster, the allocator never
 * hands one out, and a cluster is used as an L2 table only if it is not metadata of another
 * kind. So a hostile or damaged image (an L2 entry pointing into the L1 table, a refcount of
 * zero on an L2 table) cannot make a write destroy metadata: the write fails as corruption.
 * The set follows the metadata: allocation sites add, releasing a cluster removes.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2/qcow2.h"
#include "util/misc.h"

static uint64_t slot_of(uint64_t key, uint64_t cap)
{
    return (key * 0x9e3779b97f4a7c15ull) >> 17 & (cap - 1);
}

static int grow(struct qcow2_meta_set *m)
{
    uint64_t ncap = m->cap ? m->cap * 2 : 1024;
    uint64_t *keys = calloc(ncap, sizeof(*keys));
    uint8_t *types = calloc(ncap, 1);
    if (!keys || !types) {
        free(keys);
        free(types);
        return -ENOMEM;
    }
    for (uint64_t i = 0; i < m->cap; i++) {
        if (m->types[i]) {
            uint64_t s = slot_of(m->keys[i], ncap);
            while (types[s]) {
                s = (s + 1) & (ncap - 1);
            }
            keys[s] = m->keys[i];
            types[s] = m->types[i];
        }
    }
    free(m->keys);
    free(m->types);
    m->keys = keys;
    m->types = types;
    m->cap = ncap;
    return 0;
}

int qcow2_meta_type(const struct qcow2_state *q, uint64_t cluster)
{
    const struct qcow2_meta_set *m = &q->meta;
    if (!m->cap) {
        return 0;
    }
    for (uint64_t s = slot_of(cluster, m->cap);; s = (s + 1) & (m->cap - 1)) {
        if (!m->types[s]) {
            return 0;
        }
        if (m->keys[s] == cluster && m->types[s] != QCOW2_META_TOMBSTONE) {
            return m->types[s];
        }
    }
}

int qcow2_meta_add(struct qcow2_state *q, uint64_t off, uint64_t len, int type)
{
    struct qcow2_meta_set *m = &q->meta;
    if (!len) {
        return 0;
    }
    for (uint64_t c = off >> q->cluster_bits; c <= (off + len - 1) >> q->cluster_bits; c++) {
        int t = qcow2_meta_type(q, c);
        if (t == type) {
            continue;
        }
        if (t) {
            m->conflicts++;
            continue; /* the first role wins; the conflict is reported by open/check */
        }
        if ((m->used + 1) * 2 > m->cap) {
            int r = grow(m);
            if (r < 0) {
                return r;
            }
        }
        uint64_t s = slot_of(c, m->cap);
        while (m->types[s] && m->types[s] != QCOW2_META_TOMBSTONE) {
            s = (s + 1) & (m->cap - 1);
        }
        if (!m->types[s]) {
            m->used++;
        }
        m->keys[s] = c;
        m->types[s] = (uint8_t)type;
    }
    return 0;
}

void qcow2_meta_remove(struct qcow2_state *q, uint64_t cluster)
{
    struct qcow2_meta_set *m = &q->meta;
    if (!m->cap) {
        return;
    }
    for (uint64_t s = slot_of(cluster, m->cap);; s = (s + 1) & (m->cap - 1)) {
        if (!m->types[s]) {
            return;
        }
        if (m->keys[s] == cluster && m->types[s] != QCOW2_META_TOMBSTONE) {
            m->types[s] = QCOW2_META_TOMBSTONE;
            return;
        }
    }
}

void qcow2_meta_free(struct qcow2_state *q)
{
    free(q->meta.keys);
    free(q->meta.types);
    memset(&q->meta, 0, sizeof(q->meta));
}

const char *qcow2_meta_name(int type)
{
    static const char *const names[] = {"",
                                        "header",
                                        "L1 table",
                                        "refcount table",
                                        "refcount block",
                                        "snapshot table",
                                        "snapshot L1 table",
                                        "L2 table"};
    return type > 0 && type < (int)CT_ARRAY_SIZE(names) ? names[type] : "metadata";
}

int qcow2_meta_build(struct qcow2_state *q)
{
    int r = qcow2_meta_add(q, 0, q->cluster_size, QCOW2_META_HEADER);
    if (r == 0 && q->l1_size) {
        r = qcow2_meta_add(q, q->l1_offset, (uint64_t)q->l1_size * 8, QCOW2_META_L1);
    }
    if (r == 0 && !q->reftable_broken) {
        r = qcow2_meta_add(q, q->reftable_offset, (uint64_t)q->reftable_clusters << q->cluster_bits,
                           QCOW2_META_REFTABLE);
    }
    for (uint64_t i = 0; r == 0 && i < q->reftable_entries; i++) {
        uint64_t rb = q->reftable[i] & QCOW2_REFT_OFFSET_MASK;
        if (rb) {
            r = qcow2_meta_add(q, rb, q->cluster_size, QCOW2_META_REFBLOCK);
        }
    }
    uint64_t stlen = 0;
    for (uint32_t i = 0; r == 0 && i < q->nb_snapshots; i++) {
        const struct qcow2_snapshot *s = &q->snapshots[i];
        uint32_t extra = s->extra_size;
        stlen += ct_align_up(QS_FIXED_LEN + extra + strlen(s->id) + strlen(s->name), 8);
        if (s->l1_size) {
            r = qcow2_meta_add(q, s->l1_offset, (uint64_t)s->l1_size * 8, QCOW2_META_SNAP_L1);
        }
    }
    if (r == 0 && q->nb_snapshots) {
        r = qcow2_meta_add(q, q->snapshots_offset, stlen, QCOW2_META_SNAPTABLE);
    }
    for (uint32_t i = 0; r == 0 && i < q->l1_size; i++) {
        uint64_t l2 = q->l1[i] & QCOW2_L1E_OFFSET_MASK;
        if (l2) {
            r = qcow2_meta_add(q, l2, q->cluster_size, QCOW2_META_L2);
        }
    }
    return r;
}

int qcow2_meta_check_data(struct qcow2_state *q, uint64_t off, uint64_t len)
{
    if (!len) {
        return 0;
    }
    for (uint64_t c = off >> q->cluster_bits; c <= (off + len - 1) >> q->cluster_bits; c++) {
        int t = qcow2_meta_type(q, c);
        if (t) {
            return qcow2_corrupt(q, "guest data write to host offset 0x%llx would overwrite the %s",
                                 (unsigned long long)(c << q->cluster_bits), qcow2_meta_name(t));
        }
    }
    return 0;
}
