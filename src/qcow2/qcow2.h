/*
 * qcow2 driver internals, one header with a section per file (QEMU's block/qcow2.h shape).
 *
 * Crash-ordering invariants (a kill -9 or power loss at any instant leaves an image that
 * qemu-img check reports with leaks at most):
 *  Q1. Guest data reaches the file before any L2 entry that points to it.
 *  Q2. A refcount increase reaches the file before the L2/L1/header reference that needs it.
 *      The L2 cache enforces this: writing a dirty L2 table first writes every dirty refcount
 *      block and issues a barrier (fdatasync) if anything was written since the last one.
 *  Q3. An L2 table reaches the file before the L1 entry that points to it: L1 changes are kept
 *      in memory and written by qcow2_flush_metadata after all dirty L2 tables.
 *  Q4. A refcount decrease is applied (even in memory) only after the structure that dropped
 *      the reference is durable: frees go to a pending list that qcow2_flush_metadata applies
 *      after writing L2/L1 and a barrier. So the refcount cache only ever holds values that are
 *      safe to write at any moment (>= the true count), and a freed cluster is not reused
 *      before the reference to it is gone from the disk.
 *  Q5. Structures that move (L1 table, refcount table) are written in full at their new place,
 *      followed by a barrier, before the header field that points to them is rewritten; the
 *      old copy is freed through Q4.
 *  Q6. The dirty bit (v3) is set, with a barrier, before the first metadata change of a
 *      read-write session, and cleared only after a complete flush on close. Finding it set on
 *      a read-write open triggers a check with leak and error repair.
 */
#ifndef CT_QCOW2_H
#define CT_QCOW2_H

#include <stdbool.h>
#include <stdint.h>

#include "image/image.h"
#include "qcow2/qcow2-ondisk.h"

struct qcow2_state;

typedef int (*qcow2_diff_fn)(void *opaque, uint64_t off, uint64_t len);

/* ---- qcow2-cache.c: bounded LRU cache of cluster-sized tables (L2 tables, refblocks) ---- */

enum qcow2_cache_kind { QCOW2_CACHE_L2, QCOW2_CACHE_REFBLOCK };

struct qcow2_cache_entry {
    uint64_t host_off; /* 0 = empty slot */
    uint8_t *table;
    uint64_t lru;
    int ref;
    bool dirty;
    int next; /* hash chain, -1 terminated */
};

struct qcow2_cache {
    struct qcow2_state *q;
    enum qcow2_cache_kind kind;
    unsigned nslots;
    struct qcow2_cache_entry *slots;
    int *buckets;
    unsigned nbuckets;
    uint64_t clock;
};

int qcow2_cache_init(struct qcow2_cache *c, struct qcow2_state *q, enum qcow2_cache_kind kind,
                     unsigned nslots);
void qcow2_cache_destroy(struct qcow2_cache *c);
/* Borrow the table at host_off, reading it unless `fresh` (then it is zero-filled). */
int qcow2_cache_get(struct qcow2_cache *c, uint64_t host_off, bool fresh,
                    struct qcow2_cache_entry **out);
void qcow2_cache_put(struct qcow2_cache *c, struct qcow2_cache_entry *e);
void qcow2_cache_mark_dirty(struct qcow2_cache *c, struct qcow2_cache_entry *e);
/* Write every dirty table (with Q2 ordering for L2). */
int qcow2_cache_flush(struct qcow2_cache *c);
/* Write one entry now (with Q2 ordering for L2). */
int qcow2_cache_write_entry(struct qcow2_cache *c, struct qcow2_cache_entry *e);
/* Drop a cached table without writing it (its cluster is being freed or rebuilt). */
void qcow2_cache_discard(struct qcow2_cache *c, uint64_t host_off);
void qcow2_cache_drop_all(struct qcow2_cache *c);

/* ---- qcow2.c ---- */

struct qcow2_snapshot {
    uint64_t l1_offset;
    uint32_t l1_size;
    char *id;
    char *name;
    uint32_t date_sec, date_nsec;
    uint64_t vm_clock_nsec;
    uint64_t vm_state_size;
    uint64_t disk_size;
    uint64_t icount;
    uint32_t extra_size; /* as found; cowtree writes at least 24 */
    uint8_t *extra;      /* raw extra data (preserved) */
};

struct qcow2_ext {
    uint32_t type, len;
    uint8_t *data;
};

enum {
    QCOW2_META_HEADER = 1,
    QCOW2_META_L1,
    QCOW2_META_REFTABLE,
    QCOW2_META_REFBLOCK,
    QCOW2_META_SNAPTABLE,
    QCOW2_META_SNAP_L1,
    QCOW2_META_L2,
    QCOW2_META_TOMBSTONE = 255,
};

struct qcow2_meta_set {
    uint64_t *keys; /* cluster indexes */
    uint8_t *types;
    uint64_t cap, used;
    uint64_t conflicts; /* clusters claimed by two roles */
};

struct qcow2_pending_free {
    uint64_t off, len; /* host byte range; every cluster it touches loses one reference */
};

struct qcow2_state {
    struct ct_image *img;
    struct ct_file *file;

    int version;
    unsigned cluster_bits;
    uint64_t cluster_size;
    unsigned refcount_order, refcount_bits;
    uint64_t refcount_max;
    uint64_t refblock_entries;
    uint64_t incompat, compat, autoclear;
    uint32_t header_length;
    uint8_t *header_extra; /* header bytes past 112 (unknown additional fields), preserved */
    int compression_type;

    bool ext_l2;
    unsigned l2_entry_bytes;
    uint64_t l2_entries;
    uint64_t subcluster_size;
    unsigned csize_shift;
    uint64_t csize_mask, coffset_mask;

    uint32_t l1_size;
    uint64_t l1_offset;
    uint64_t *l1;                      /* host byte order */
    uint32_t l1_dirty_lo, l1_dirty_hi; /* dirty index range [lo, hi) */

    uint64_t reftable_offset;
    uint32_t reftable_clusters;
    uint64_t reftable_entries;
    uint64_t *reftable;
    bool reftable_pending; /* new table in memory, not yet on disk (Q5) */
    bool reftable_broken;  /* repair open of an image whose refcount table is unusable */

    uint32_t nb_snapshots;
    uint64_t snapshots_offset;
    uint64_t snapshots_bytes; /* the table's size on disk (entries as they were written) */
    struct qcow2_snapshot *snapshots;

    struct qcow2_ext *exts; /* unknown extensions, preserved in order */
    unsigned nexts;
    uint8_t *feature_table; /* raw feature name table, for error messages */
    uint32_t feature_table_len;
    uint8_t *bitmaps_ext; /* raw bitmaps extension */
    uint32_t bitmaps_ext_len;

    struct qcow2_cache l2_cache, rb_cache;
    struct qcow2_meta_set meta;

    uint64_t free_hint; /* cluster index where the free-cluster search starts */
    struct {
        uint64_t start, n;
    } reserved[16];
    unsigned nreserved;

    struct qcow2_pending_free *pending;
    size_t npending, pending_cap;

    bool unsynced;         /* something was written since the last fdatasync */
    bool dirty_on_disk;    /* the header on disk carries the dirty bit */
    bool meta_changed;     /* metadata changed in this session */
    uint32_t *repair_refs; /* during repair: computed references (allocator treats >0 as used) */
    uint64_t repair_nclusters;

    uint64_t cfree_off; /* next free byte in the cluster compressed data is packed into, 0 = none */
    uint64_t host_end;  /* bytes: max(file size at open, end of every cluster allocated since) */
    uint8_t *zeros;     /* one cluster of zeros */
    uint64_t cbuf_entry; /* L2 entry of the cluster held decompressed in cbuf, 0 = none */
    uint8_t *cbuf;
    uint8_t *cin;
};

static inline struct qcow2_state *qstate(struct ct_image *img)
{
    return img->drv_state;
}

/* Issue an fdatasync if anything was written since the last one. */
int qcow2_barrier(struct qcow2_state *q);
/* Write the header's fixed fields [start, start+len) from current state. */
int qcow2_write_header_fields(struct qcow2_state *q, unsigned start, unsigned len);
/* Rewrite the whole first cluster (header, extensions, backing name). */
int qcow2_rewrite_header(struct qcow2_state *q);
/* Set the dirty bit before the first metadata change of the session (Q6). */
int qcow2_mark_dirty(struct qcow2_state *q);
/* Q2-Q5: write refblocks, barrier, L2 tables, barrier, L1, apply pending frees. */
int qcow2_flush_metadata(struct qcow2_state *q);
/* Name of an incompatible feature bit from the image's feature table, or NULL. */
const char *qcow2_feature_name(struct qcow2_state *q, int type, int bit, char *buf, size_t len);
/* Signal corruption found on the data path: message once, poison the handle. */
int qcow2_corrupt(struct qcow2_state *q, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* Grow the L1 table so that it has at least min_size entries (Q5). */
int qcow2_grow_l1(struct qcow2_state *q, uint32_t min_size);
/* ---- qcow2-snapshot.c ---- */
/* Parse the snapshot table (open). */
int qcow2_read_snapshots(struct qcow2_state *q, struct ct_err *err);
int qcow2_snapshot_find(struct qcow2_state *q, const char *key, struct ct_err *err);
/* Write the snapshot table anew (same entries) and switch the header to it. */
int qcow2_snapshot_rewrite_table(struct qcow2_state *q);
int qcow2_snapshot_create(struct qcow2_state *q, const char *name,
                          const struct ct_snapshot_create_opts *o, struct ct_err *err);
int qcow2_snapshot_delete(struct qcow2_state *q, const char *key, struct ct_err *err);
int qcow2_snapshot_apply(struct qcow2_state *q, const char *key, struct ct_err *err);
/* Make a read-only handle show the snapshot's state (open with opts->snapshot). */
int qcow2_snapshot_use_for_read(struct qcow2_state *q, const char *key, struct ct_err *err);
/* Diff between snapshot `from` and snapshot `to` (NULL: the active state). */
int qcow2_snapshot_diff(struct qcow2_state *q, const char *from, const char *to, qcow2_diff_fn fn,
                        void *opaque, struct ct_err *err);
int qcow2_snapshot_read_vmstate(struct qcow2_state *q, const char *key, void *buf, uint64_t len,
                                uint64_t off, struct ct_err *err);

/* ---- qcow2-refcount.c ---- */

int qcow2_refcount_get(struct qcow2_state *q, uint64_t cluster, uint64_t *out);
/* Store refcount v as entry i of a refcount block buffer (any refcount width). */
void qcow2_refblock_entry_set(const struct qcow2_state *q, uint8_t *t, uint64_t i, uint64_t v);
/* Add delta to a cluster's refcount (may allocate refcount blocks / grow the table). */
int qcow2_refcount_update(struct qcow2_state *q, uint64_t cluster, int64_t delta);
/* Set a cluster's refcount (repair). */
int qcow2_refcount_set(struct qcow2_state *q, uint64_t cluster, uint64_t value);
/* Allocate n contiguous clusters with refcount 1; returns the host byte offset. */
int qcow2_alloc_clusters(struct qcow2_state *q, uint64_t n, uint64_t *host_off);
/* Allocate n contiguous clusters, but at most, starting from the same place: returns how many
 * could be had contiguously (>= 1) in *got. */
int qcow2_alloc_clusters_upto(struct qcow2_state *q, uint64_t n, uint64_t *host_off, uint64_t *got);
/* Queue the release of a reference to every cluster [off, off+len) touches (Q4). */
int qcow2_free_later(struct qcow2_state *q, uint64_t off, uint64_t len);
/* Apply the pending frees (only from qcow2_flush_metadata, after a barrier). */
int qcow2_apply_pending_frees(struct qcow2_state *q);
/* Load the refcount table (open). */
int qcow2_refcount_open(struct qcow2_state *q, struct ct_err *err);

/* ---- qcow2-cluster.c ---- */

enum qcow2_kind { QK_UNALLOC, QK_ZERO, QK_DATA, QK_COMPRESSED };
struct qcow2_status {
    enum qcow2_kind kind;
    uint64_t len;
    uint64_t host_off; /* QK_DATA: host offset of the first byte */
    uint64_t l2_entry; /* QK_COMPRESSED: the descriptor */
};
int qcow2_get_status(struct qcow2_state *q, uint64_t off, uint64_t len, struct qcow2_status *st);
int qcow2_pread(struct ct_image *img, void *buf, uint64_t len, uint64_t off);
/* Read through the current L1 without the image layer's bounds (VM state past the disk). */
int qcow2_pread_raw(struct qcow2_state *q, void *buf, uint64_t len, uint64_t off);
int qcow2_pwrite(struct ct_image *img, const void *buf, uint64_t len, uint64_t off);
int qcow2_pwrite_zeroes(struct ct_image *img, uint64_t len, uint64_t off, unsigned flags);
int qcow2_discard(struct ct_image *img, uint64_t len, uint64_t off);
int qcow2_pwrite_compressed(struct qcow2_state *q, const uint8_t *buf, uint64_t off);
int qcow2_block_status(struct ct_image *img, uint64_t off, uint64_t len, struct ct_extent *out);
/* Drop every cluster in [off, off+len) (whole clusters): entries become 0 (full discard). */
int qcow2_discard_range(struct qcow2_state *q, uint64_t off, uint64_t len, bool full);
/* Preallocate metadata (and data for falloc/full) for the whole virtual disk. */
int qcow2_preallocate(struct qcow2_state *q, enum ct_prealloc mode);
/* Compressed descriptor → host byte range counted by refcounts. */
void qcow2_compressed_range(struct qcow2_state *q, uint64_t l2e, uint64_t *off, uint64_t *len);

/* ---- qcow2-compress.c ---- */

int qcow2_decompress(int type, const uint8_t *in, size_t in_len, uint8_t *out, size_t out_len);
/* Returns -ENOSPC when the result would not fit in out_cap (store uncompressed then). */
int qcow2_compress(int type, const uint8_t *in, size_t in_len, uint8_t *out, size_t out_cap,
                   size_t *out_len);

/* ---- qcow2-diff.c ---- */

/* Report (merged, ascending) the guest extents that may differ between two L1 tables. */
int qcow2_diff_l1(struct qcow2_state *q, const uint64_t *a, uint32_t na, const uint64_t *b,
                  uint32_t nb, uint64_t size_a, uint64_t size_b, qcow2_diff_fn fn, void *opaque);

/* ---- qcow2-overlap.c ---- */

int qcow2_meta_build(struct qcow2_state *q);
int qcow2_meta_add(struct qcow2_state *q, uint64_t off, uint64_t len, int type);
void qcow2_meta_remove(struct qcow2_state *q, uint64_t cluster);
int qcow2_meta_type(const struct qcow2_state *q, uint64_t cluster);
const char *qcow2_meta_name(int type);
/* -CT_E_CORRUPT (handle poisoned) if [off, off+len) touches metadata. */
int qcow2_meta_check_data(struct qcow2_state *q, uint64_t off, uint64_t len);
void qcow2_meta_free(struct qcow2_state *q);

/* ---- qcow2-amend.c ---- */

/* compat: 0 keep, 2 or 3; lazy: -1 keep, 0 off, 1 on. */
int qcow2_amend(struct qcow2_state *q, int compat, int lazy, struct ct_err *err);

/* ---- qcow2-compact.c ---- */

/* Move clusters down, truncate, punch holes; returns clusters moved and the new file end. */
int qcow2_compact(struct qcow2_state *q, uint64_t *moved, uint64_t *new_end);

/* ---- qcow2-check.c ---- */

int qcow2_check(struct ct_image *img, unsigned fix, struct ct_check_result *res,
                ct_check_report_fn report, void *opaque, struct ct_err *err);

/* ---- qcow2-create.c ---- */

int qcow2_create(const char *path, const struct ct_create_opts *o, uint64_t size,
                 struct ct_err *err);

#endif
