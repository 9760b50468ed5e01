/*
 * The format-neutral image layer (QEMU's block/io.c role): bounds checks, backing-chain
 * read-through, chain opening with loop and depth limits, and the poisoned state.
 *
 * Invariants:
 *  I1. Drivers are called only with ranges inside [0, img->size); image.c validates.
 *  I2. A backing file is always opened read-only and its format is never probed: it comes from
 *      the overlay's metadata or the caller.
 *  I3. After a failed metadata update the handle is poisoned (img->poison < 0) and every
 *      mutating call returns -CT_E_STATE until it is closed and reopened.
 */
#ifndef CT_IMAGE_H
#define CT_IMAGE_H

#include <stdbool.h>
#include <stdint.h>

#include "cowtree/cowtree.h"
#include "io/io.h"

struct ct_image;

struct ct_driver {
    const char *name;
    /* Parse the open file; set img->size and the backing name/format. */
    int (*open)(struct ct_image *img, struct ct_err *err);
    /* Called once the backing chain is open (may repair a dirty image). */
    int (*post_open)(struct ct_image *img, struct ct_err *err);
    /* Flush (if writable and not poisoned) and free driver state. */
    int (*close)(struct ct_image *img);
    int (*pread)(struct ct_image *img, void *buf, uint64_t len, uint64_t off);
    int (*pwrite)(struct ct_image *img, const void *buf, uint64_t len, uint64_t off);
    int (*pwrite_zeroes)(struct ct_image *img, uint64_t len, uint64_t off, unsigned flags);
    int (*discard)(struct ct_image *img, uint64_t len, uint64_t off);
    int (*flush)(struct ct_image *img);
    int (*block_status)(struct ct_image *img, uint64_t off, uint64_t len, struct ct_extent *out);
    int (*truncate)(struct ct_image *img, uint64_t size, bool shrink, struct ct_err *err);
    int (*info)(struct ct_image *img, struct ct_image_info *info);
    int (*check)(struct ct_image *img, unsigned fix, struct ct_check_result *res,
                 ct_check_report_fn report, void *opaque, struct ct_err *err);
    /* The host_off of a DATA extent that is not COMPRESSED names bytes of img->file that
     * read, as they are, as the guest's: the chain index may read them there directly. */
    bool direct_data;
};

struct ct_image {
    const struct ct_driver *drv;
    void *drv_state;
    struct ct_file *file;
    char *filename;
    uint64_t size;
    unsigned flags; /* ct_open_flags */
    bool writable;
    int poison;           /* 0, or the error that poisoned the handle */
    char poison_msg[512]; /* why, when a driver said (corruption found on the data path) */
    unsigned depth;
    uint64_t cache_bytes; /* metadata cache budget (0 = default) */
    const char *snapshot; /* internal snapshot to show (read-only), borrowed during open */

    /* Backing link as stored in the image, and the resolved path. */
    char *backing_name;
    char *backing_format;
    char *backing_path;
    struct ct_image *backing;
    struct chain_index *index; /* which layer below provides what (chain-index.c), or NULL */
};

/* chain-index.c: read [off, off+len) (inside the backing's size) from img's backing chain,
 * going straight to the layer that provides each granule. */
int image_read_below_indexed(struct ct_image *img, void *buf, uint64_t len, uint64_t off);
/* Something below some top may read differently now: every index is stale (X1). */
void image_chain_changed(void);
void image_index_free(struct ct_image *img);

extern const struct ct_driver ct_raw_driver;
extern const struct ct_driver ct_qcow2_driver;

/* Content of [off, off+len) as the layer below img sees it: the backing chain, zeros past its
 * end, or zeros when there is no backing file. */
int image_read_below(struct ct_image *img, void *buf, uint64_t len, uint64_t off);

/* Does [off, off+len) read as zeros in everything below img? Conservative: false if unsure. */
bool image_below_is_zero(struct ct_image *img, uint64_t len, uint64_t off);

/* Poison the handle after a failed metadata update (I3). Returns err. */
int image_poison(struct ct_image *img, int err);

/* Resolve a backing name relative to the directory of the overlay's filename. Owned result. */
char *image_resolve_backing(const char *overlay, const char *backing);

#endif
