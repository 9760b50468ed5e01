/*
 * libcowtree: a qcow2-compatible copy-on-write image engine.
 *
 * This is the whole public API. Conventions (see docs/design.md):
 *  - Functions returning int return >= 0 on success and < 0 on failure: either -errno or one
 *    of the CT_E_* codes below (all below -10000, outside errno's range).
 *  - Control-path calls (open, create, check, ...) take a caller-owned `struct ct_err *err`
 *    last; it may be NULL. On failure it holds one human-readable message naming what is wrong.
 *    On success it is not touched.
 *  - Data-path calls (pread, pwrite, ...) return -errno only and take no err.
 *  - Offsets and lengths are in bytes, guest offsets unless a name says host_.
 */
#ifndef COWTREE_H
#define COWTREE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define CT_VERSION_STRING "0.1.0"

/* Project error codes, returned negated like errno values. */
enum {
    CT_E_CORRUPT = 10001,     /* image metadata is inconsistent */
    CT_E_UNSUPPORTED = 10002, /* feature, version or option not supported */
    CT_E_STATE = 10003,       /* handle poisoned by an earlier failure, or wrong state */
    CT_E_BUSY = 10004,        /* image locked by another user */
    CT_E_FORMAT = 10005,      /* file is not in the expected format */
};

struct ct_err {
    int code; /* negative: -errno or -CT_E_* */
    char msg[1024];
};

/* Map an error code (negative or positive) to a static string. */
const char *ct_strerror(int code);

/* ---- Fault injection (tests only; costs one predictable branch per I/O call). ----
 * spec is a comma-separated list of rules "OP:K:ACTION" where OP is write|flush|any,
 * K is the 1-based index of the matching call in this process, ACTION is eio|enospc|kill.
 * Example: "write:12:kill" stops the process dead (SIGKILL) at the 12th write.
 * "count" alone enables counting only. Returns 0 or -EINVAL. */
int ct_fault_configure(const char *spec);
/* Number of write and flush calls made so far through the I/O layer. */
void ct_fault_counts(uint64_t *writes, uint64_t *flushes);

/* ---- Images ---- */

struct ct_image;

enum ct_open_flags {
    CT_OPEN_WRITE = 1u << 0,      /* open the top image read-write (backing files stay read-only) */
    CT_OPEN_NO_BACKING = 1u << 1, /* do not open the backing chain (reads of unallocated = zero) */
    CT_OPEN_FORCE_SHARE = 1u << 2,   /* read-only, do not take or test locks (qemu-img -U) */
    CT_OPEN_NO_REPAIR = 1u << 3,     /* do not repair a dirty image on read-write open */
    CT_OPEN_WRITETHROUGH = 1u << 4,  /* flush after every write (qemu's cache=writethrough) */
    CT_OPEN_ALLOW_CORRUPT = 1u << 5, /* allow write open of a corrupt-marked image (repair) */
    /* Ignore flushes, the metadata barriers included (qemu's cache=unsafe): for copies that
     * can be redone. A crash or power loss may leave the image corrupt. */
    CT_OPEN_NO_FLUSH = 1u << 6,
};

struct ct_open_opts {
    const char *format;       /* "qcow2", "raw" or NULL; NULL = qcow2 if the magic says so */
    unsigned flags;           /* enum ct_open_flags */
    unsigned max_chain_depth; /* 0 = default (1024) */
    uint64_t cache_bytes;     /* metadata cache size per qcow2 layer; 0 = default (32 MiB) */
    const char *snapshot;     /* open this internal snapshot (name or id), read-only */
    /* Security policy: when set, a colon-separated list of directories; every backing file
     * must resolve (symlinks followed) to a path inside one of them, or open fails. */
    const char *backing_dirs;
};

/* Open an image and its backing chain. *out is set on success, left NULL on failure. */
int ct_image_open(struct ct_image **out, const char *path, const struct ct_open_opts *opts,
                  struct ct_err *err);
/* Flush, clear the dirty bit, release locks and free. Accepts NULL. Returns the flush result. */
int ct_image_close(struct ct_image *img, struct ct_err *err);

uint64_t ct_image_size(const struct ct_image *img);
/* Why a data-path call failed with -CT_E_CORRUPT (corruption found in this image or a
 * backing file), or NULL. Borrowed, valid until close. */
const char *ct_image_last_error(const struct ct_image *img);
const char *ct_image_filename(const struct ct_image *img);
const char *ct_image_format(const struct ct_image *img);
/* Next image down the chain (borrowed, valid until close of the top), or NULL. */
struct ct_image *ct_image_backing(const struct ct_image *img);

/* Switch one layer of an open chain (the top or any backing layer) between read-only and
 * read-write in place, keeping the chain and every pointer to the layer valid (QEMU's
 * bdrv_reopen for block-commit's base). Going read-only flushes and clears the dirty bit;
 * going read-write takes the write lock and repairs a dirty image as an open would. The file
 * is closed and opened again in between (its lock is briefly released). On failure the layer
 * is back in its old mode, or, if even that reopen failed, every request on it fails with
 * -EIO (the message says why). */
int ct_image_reopen(struct ct_image *img, bool writable, struct ct_err *err);

/* Make `backing` (an open chain, or NULL) img's open backing chain and return the chain it
 * had (now detached: the caller closes it, or attaches it elsewhere). Touches no file: the
 * link stored in img is changed separately (ct_image_change_backing); the caller makes sure
 * the new chain shows what the link names. Used by live jobs to drop committed or streamed
 * layers and to pivot onto a layer of the chain. */
struct ct_image *ct_image_swap_backing(struct ct_image *img, struct ct_image *backing);

enum ct_write_flags {
    CT_WRITE_FUA = 1u << 0,   /* durable when the call returns */
    CT_WRITE_UNMAP = 1u << 1, /* pwrite_zeroes may deallocate */
};

int ct_image_pread(struct ct_image *img, void *buf, uint64_t len, uint64_t off);
int ct_image_pwrite(struct ct_image *img, const void *buf, uint64_t len, uint64_t off,
                    unsigned flags);
/* Write one whole cluster compressed (qcow2; off cluster-aligned, len = the cluster size, or
 * less for the last cluster of an image whose size is not cluster-aligned). Data that does
 * not compress is stored uncompressed, as QEMU does. */
int ct_image_pwrite_compressed(struct ct_image *img, const void *buf, uint64_t len, uint64_t off);
/* Copy [src_off, src_off+len) of src to dst_off of dst without passing the bytes through
 * user space (copy_file_range; convert -C). Only between two raw images on POSIX files: else
 * -EOPNOTSUPP, and any other -errno the kernel gives (-EXDEV, -EINVAL, ...) also means "copy
 * the bytes yourself". Raw images only, so it is safe to call on one target handle from
 * several threads. */
int ct_image_copy_range(struct ct_image *src, uint64_t src_off, struct ct_image *dst,
                        uint64_t dst_off, uint64_t len);
/* Start writing img's file back to disk after every `bytes` written through this handle,
 * without waiting (0: off, the default). For long copies that end in a flush. */
void ct_image_set_write_behind(struct ct_image *img, uint64_t bytes);
/* Cluster size of a qcow2 image (0 for raw): the unit of pwrite_compressed. */
uint64_t ct_image_cluster_size(const struct ct_image *img);
int ct_image_pwrite_zeroes(struct ct_image *img, uint64_t len, uint64_t off, unsigned flags);
/* Advisory: only whole clusters are dropped, as in QEMU. */
int ct_image_discard(struct ct_image *img, uint64_t len, uint64_t off);
int ct_image_flush(struct ct_image *img);
int ct_image_truncate(struct ct_image *img, uint64_t new_size, bool allow_shrink,
                      struct ct_err *err);

/* Rewrite the backing link stored in the image (backing NULL or "" = none; fmt required
 * otherwise). Only the link changes: no data is copied and the open chain is not reopened,
 * so close and reopen to read through the new chain. qcow2 only. */
int ct_image_change_backing(struct ct_image *img, const char *backing, const char *fmt,
                            struct ct_err *err);
/* Drop every cluster of the image so that all reads fall through to the backing file
 * (qemu-img commit's emptying of the top image). qcow2 only. */
int ct_image_make_empty(struct ct_image *img, struct ct_err *err);

/* Change qcow2 options in place: compat 0 (keep), 2 (0.10) or 3 (1.1); lazy_refcounts -1 (keep),
 * 0 or 1. */
int ct_image_amend(struct ct_image *img, int compat, int lazy_refcounts, struct ct_err *err);

/* Give free space back to the filesystem (qcow2): move clusters from the end of the file
 * into free space, truncate, punch holes for the rest. Crash-safe at every step; the content
 * of the active state and of every snapshot is unchanged. Reports bytes the file occupied on
 * disk before and after. */
struct ct_compact_result {
    uint64_t clusters_moved;
    uint64_t file_size_before, file_size_after;
    uint64_t allocated_before, allocated_after;
};
int ct_image_compact(struct ct_image *img, struct ct_compact_result *res, struct ct_err *err);

/* Allocation status of one layer (the image itself, not its backing). */
enum ct_status_flags {
    CT_STATUS_ALLOCATED = 1u << 0, /* this layer decides the content (data or zero) */
    CT_STATUS_ZERO = 1u << 1,      /* reads as zero */
    CT_STATUS_DATA = 1u << 2,      /* has host data (offset valid unless COMPRESSED) */
    CT_STATUS_COMPRESSED = 1u << 3,
};
struct ct_extent {
    uint64_t len;
    unsigned flags;
    uint64_t host_off; /* valid when DATA and not COMPRESSED */
};
/* Status of [off, off+len) in this layer only, for the longest prefix of equal status.
 * len is clipped to the image size. */
int ct_image_block_status(struct ct_image *img, uint64_t off, uint64_t len, struct ct_extent *out);

/* Chain-wide status, as qemu-img map: depth is the index of the layer that provides the
 * content (0 = top); when no layer allocates it, depth = chain length - 1 and ALLOCATED is
 * clear. */
struct ct_map_extent {
    uint64_t off, len;
    unsigned flags;
    unsigned depth;
    uint64_t host_off;
    const struct ct_image *layer;
};
int ct_image_map(struct ct_image *img, uint64_t off, uint64_t len, struct ct_map_extent *out);

/* ---- Creation ---- */

enum ct_prealloc { CT_PREALLOC_OFF, CT_PREALLOC_METADATA, CT_PREALLOC_FALLOC, CT_PREALLOC_FULL };

struct ct_create_opts {
    const char *format; /* "qcow2" or "raw" */
    uint64_t size;      /* virtual size; 0 with a backing file = the backing file's */
    bool size_given;
    const char *backing_file;   /* as stored in the header (may be relative) */
    const char *backing_format; /* required with backing_file */
    bool no_open_backing;       /* qemu-img create -u */
    unsigned cluster_size;      /* 0 = 64 KiB */
    int compat;                 /* 2 (0.10) or 3 (1.1); 0 = 3 */
    unsigned refcount_bits;     /* 0 = 16 */
    bool lazy_refcounts;
    bool extended_l2;
    int compression_type; /* 0 zlib, 1 zstd */
    enum ct_prealloc prealloc;
};

int ct_image_create(const char *path, const struct ct_create_opts *opts, struct ct_err *err);

/* ---- Information ---- */

struct ct_image_info {
    const char *filename;
    const char *format;
    uint64_t virtual_size;
    uint64_t actual_size; /* bytes allocated on the host filesystem */
    /* qcow2 only */
    unsigned cluster_size;
    int version; /* 2 or 3 */
    unsigned refcount_bits;
    bool lazy_refcounts, extended_l2, corrupt, dirty;
    int compression_type;
    const char *backing_file;      /* as stored, or NULL */
    const char *backing_format;    /* or NULL */
    const char *full_backing_file; /* resolved path, or NULL */
    unsigned nb_snapshots;
};
/* Fills *info; strings are borrowed from img, valid until close. */
int ct_image_info(struct ct_image *img, struct ct_image_info *info);

/* ---- Internal snapshots (qcow2) ----
 * A snapshot is selected by name or id. A string that is one snapshot's id and another's name,
 * or the name of several snapshots, is ambiguous and refused with an error naming them. */

struct ct_snapshot_info {
    const char *id, *name; /* borrowed, valid until the next snapshot call or close */
    uint64_t vm_state_size;
    uint32_t date_sec, date_nsec;
    uint64_t vm_clock_nsec;
    uint64_t disk_size; /* virtual size when the snapshot was taken */
    uint64_t icount;    /* UINT64_MAX when absent */
};

int ct_snapshot_count(struct ct_image *img);
int ct_snapshot_get(struct ct_image *img, unsigned index, struct ct_snapshot_info *out);
/* Index of the snapshot NAME_OR_ID selects, or a negative error with a message. */
int ct_snapshot_find(struct ct_image *img, const char *name_or_id, struct ct_err *err);

struct ct_snapshot_create_opts {
    uint32_t date_sec, date_nsec; /* 0 = now */
    uint64_t vm_clock_nsec;
    const void *vmstate; /* memory state saved with the snapshot, or NULL */
    uint64_t vmstate_len;
};
int ct_snapshot_create(struct ct_image *img, const char *name,
                       const struct ct_snapshot_create_opts *opts, struct ct_err *err);
/* Make the snapshot's state the active state (the virtual size becomes the snapshot's). */
int ct_snapshot_apply(struct ct_image *img, const char *name_or_id, struct ct_err *err);
int ct_snapshot_delete(struct ct_image *img, const char *name_or_id, struct ct_err *err);
/* Extents whose content may differ between snapshot `from` and snapshot `to` (NULL: the
 * active state), found from metadata alone, reported in ascending order and merged. Every
 * differing byte lies in a reported extent. fn returning < 0 stops the walk with that code. */
typedef int (*ct_extent_fn)(void *opaque, uint64_t off, uint64_t len);
int ct_snapshot_diff(struct ct_image *img, const char *from, const char *to, ct_extent_fn fn,
                     void *opaque, struct ct_err *err);
/* Read [off, off+len) of the snapshot's saved memory state. */
int ct_snapshot_read_vmstate(struct ct_image *img, const char *name_or_id, void *buf, uint64_t len,
                             uint64_t off, struct ct_err *err);

/* ---- Check and repair (qemu-img check semantics) ---- */

enum ct_check_fix { CT_FIX_NONE = 0, CT_FIX_LEAKS = 1, CT_FIX_ERRORS = 2, CT_FIX_ALL = 3 };

struct ct_check_result {
    uint64_t corruptions, leaks, check_errors;
    uint64_t corruptions_fixed, leaks_fixed;
    uint64_t image_end_offset;
    uint64_t total_clusters, allocated_clusters, fragmented_clusters, compressed_clusters;
    bool rebuilt; /* refcount structures rebuilt from scratch */
};
/* Report callback for one finding (may be NULL). */
typedef void (*ct_check_report_fn)(void *opaque, const char *line);

int ct_image_check(struct ct_image *img, unsigned fix, struct ct_check_result *res,
                   ct_check_report_fn report, void *opaque, struct ct_err *err);

#ifdef __cplusplus
}
#endif
#endif /* COWTREE_H */
