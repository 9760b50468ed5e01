/*
 * A bounded LRU cache of cluster-sized metadata tables, one for L2 tables and one for
 * refcount blocks. Entries are borrowed with get and returned with put; only unborrowed
 * entries are evicted. Writing a dirty L2 table first writes all dirty refcount blocks and
 * issues a barrier (invariant Q2 in qcow2.h): ordering is the cache's job, not the callers'.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2/qcow2.h"

static unsigned hash_off(const struct qcow2_cache *c, uint64_t off)
{
    uint64_t h = (off >> 9) * 0x9e3779b97f4a7c15ull;
    return (unsigned)(h >> 32) % c->nbuckets;
}

int qcow2_cache_init(struct qcow2_cache *c, struct qcow2_state *q, enum qcow2_cache_kind kind,
                     unsigned nslots)
{
    memset(c, 0, sizeof(*c));
    c->q = q;
    c->kind = kind;
    c->nslots = nslots;
    c->nbuckets = nslots * 2 + 1;
    c->slots = calloc(nslots, sizeof(*c->slots));
    c->buckets = malloc(c->nbuckets * sizeof(*c->buckets));
    if (!c->slots || !c->buckets) {
        free(c->slots);
        free(c->buckets);
        c->slots = NULL;
        c->buckets = NULL;
        return -ENOMEM;
    }
    for (unsigned i = 0; i < c->nbuckets; i++) {
        c->buckets[i] = -1;
    }
    for (unsigned i = 0; i < nslots; i++) {
        c->slots[i].next = -1;
    }
    return 0;
}

void qcow2_cache_destroy(struct qcow2_cache *c)
{
    if (!c->slots) {
        return;
    }
    for (unsigned i = 0; i < c->nslots; i++) {
        free(c->slots[i].table);
    }
    free(c->slots);
    free(c->buckets);
    c->slots = NULL;
    c->buckets = NULL;
}

static void unlink_slot(struct qcow2_cache *c, int idx)
{
    struct qcow2_cache_entry *e = &c->slots[idx];
    int *pp = &c->buckets[hash_off(c, e->host_off)];
    while (*pp != -1) {
        if (*pp == idx) {
            *pp = e->next;
            break;
        }
        pp = &c->slots[*pp].next;
    }
    e->next = -1;
    e->host_off = 0;
    e->dirty = false;
}

static int find_slot(struct qcow2_cache *c, uint64_t off)
{
    for (int i = c->buckets[hash_off(c, off)]; i != -1; i = c->slots[i].next) {
        if (c->slots[i].host_off == off) {
            return i;
        }
    }
    return -1;
}

static int write_table(struct qcow2_cache *c, struct qcow2_cache_entry *e)
{
    struct qcow2_state *q = c->q;
    int r = ct_file_pwrite(q->file, e->table, q->cluster_size, e->host_off);
    if (r < 0) {
        return image_poison(q->img, r);
    }
    q->unsynced = true;
    e->dirty = false;
    return 0;
}

int qcow2_cache_write_entry(struct qcow2_cache *c, struct qcow2_cache_entry *e)
{
    struct qcow2_state *q = c->q;
    if (!e->dirty) {
        return 0;
    }
    int r;
    if (c->kind == QCOW2_CACHE_L2) {
        /* Q1 + Q2: data and refcount increases must be durable before the L2 entry. */
        r = qcow2_cache_flush(&q->rb_cache);
        if (r == 0) {
            r = qcow2_barrier(q);
        }
        if (r < 0) {
            return r;
        }
    }
    return write_table(c, e);
}

int qcow2_cache_flush(struct qcow2_cache *c)
{
    if (c->kind == QCOW2_CACHE_L2) {
        /* Q1/Q2 once for the whole batch: refcount blocks and data, one barrier, then every
         * dirty L2 table without a barrier between them. */
        bool any = false;
        for (unsigned i = 0; i < c->nslots && !any; i++) {
            any = c->slots[i].host_off && c->slots[i].dirty;
        }
        if (!any) {
            return 0;
        }
        int r = qcow2_cache_flush(&c->q->rb_cache);
        if (r == 0) {
            r = qcow2_barrier(c->q);
        }
        if (r < 0) {
            return r;
        }
        for (unsigned i = 0; i < c->nslots; i++) {
            struct qcow2_cache_entry *e = &c->slots[i];
            if (e->host_off && e->dirty) {
                r = write_table(c, e);
                if (r < 0) {
                    return r;
                }
            }
        }
        return 0;
    }
    for (unsigned i = 0; i < c->nslots; i++) {
        struct qcow2_cache_entry *e = &c->slots[i];
        if (e->host_off && e->dirty) {
            int r = qcow2_cache_write_entry(c, e);
            if (r < 0) {
                return r;
            }
        }
    }
    return 0;
}

static int pick_victim(struct qcow2_cache *c)
{
    int best = -1;
    for (unsigned i = 0; i < c->nslots; i++) {
        struct qcow2_cache_entry *e = &c->slots[i];
        if (e->host_off == 0) {
            return (int)i;
        }
        if (e->ref == 0 && (best < 0 || e->lru < c->slots[best].lru)) {
            best = (int)i;
        }
    }
    return best;
}

int qcow2_cache_get(struct qcow2_cache *c, uint64_t host_off, bool fresh,
                    struct qcow2_cache_entry **out)
{
    struct qcow2_state *q = c->q;
    int idx = find_slot(c, host_off);
    if (idx >= 0) {
        struct qcow2_cache_entry *e = &c->slots[idx];
        if (fresh) {
            memset(e->table, 0, q->cluster_size);
        }
        e->ref++;
        e->lru = ++c->clock;
        *out = e;
        return 0;
    }
    idx = pick_victim(c);
    if (idx < 0) {
        return -ENOMEM; /* every slot borrowed: a bug, the cache is sized for nesting */
    }
    struct qcow2_cache_entry *e = &c->slots[idx];
    if (e->host_off) {
        int r = qcow2_cache_write_entry(c, e);
        if (r < 0) {
            return r;
        }
        unlink_slot(c, idx);
    }
    if (!e->table) {
        e->table = malloc(q->cluster_size);
        if (!e->table) {
            return -ENOMEM;
        }
    }
    if (fresh) {
        memset(e->table, 0, q->cluster_size);
    } else {
        int r = ct_file_pread(q->file, e->table, q->cluster_size, host_off);
        if (r < 0) {
            return r;
        }
    }
    e->host_off = host_off;
    e->dirty = false;
    e->ref = 1;
    e->lru = ++c->clock;
    unsigned b = hash_off(c, host_off);
    e->next = c->buckets[b];
    c->buckets[b] = idx;
    *out = e;
    return 0;
}

void qcow2_cache_put(struct qcow2_cache *c, struct qcow2_cache_entry *e)
{
    e->ref--;
}

void qcow2_cache_mark_dirty(struct qcow2_cache *c, struct qcow2_cache_entry *e)
{
    e->dirty = true;
}

void qcow2_cache_discard(struct qcow2_cache *c, uint64_t host_off)
{
    int idx = find_slot(c, host_off);
    if (idx >= 0 && c->slots[idx].ref == 0) {
        unlink_slot(c, idx);
    }
}

void qcow2_cache_drop_all(struct qcow2_cache *c)
{
    for (unsigned i = 0; i < c->nslots; i++) {
        if (c->slots[i].host_off && c->slots[i].ref == 0) {
            unlink_slot(c, (int)i);
        }
    }
}
