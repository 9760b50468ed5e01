/*
 * Helpers the chain jobs share: who decides the content of a range in a list of layers, file
 * identity, zero detection and zero writes that survive a change of backing file.
 */
#ifndef CT_JOB_CHAIN_H
#define CT_JOB_CHAIN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cowtree/cowtree.h"

/* Maximum length asked of block status in one call (it stops at L2 boundaries anyway). */
#define JOB_STATUS_STEP (1ull << 40)

/* The layer that decides [off, off+len) first bytes. */
struct job_extent {
    uint64_t len;
    unsigned flags; /* CT_STATUS_* of that layer (ALLOCATED|ZERO for a layer that is too short) */
    unsigned layer; /* index in layers[]; == n when none of them allocates it (falls below) */
};

/*
 * Resolve the longest prefix of [off, off+len) that one layer decides: the topmost of
 * layers[0..n) that allocates it. A layer shorter than off decides it too (as zeros: reads
 * past a backing file's end return zeros, hiding what lies below). layers[i+1] must be the
 * backing of layers[i]; the handles may be opened without their backing.
 */
int job_chain_status(struct ct_image *const *layers, unsigned n, uint64_t off, uint64_t len,
                     struct job_extent *out);

/* Does the whole chain of img read [off, off+len) as zeros, per metadata only? */
bool job_reads_zero(struct ct_image *img, uint64_t off, uint64_t len);

/* Read img's guest view of [off, off+len), zeros past its end; img NULL reads zeros. */
int job_read_view(struct ct_image *img, void *buf, uint64_t len, uint64_t off);

/* Are a and b the same file (device and inode)? false when either cannot be stat'ed. */
bool job_same_file(const struct ct_image *a, const struct ct_image *b);
bool job_same_path(const char *a, const char *b);

/* Is buf all zeros? */
bool job_is_zero(const void *buf, size_t len);

/*
 * Make [off, off+len) of img read as zeros in a way that stays true whatever its backing file
 * becomes later (rebase, stream): zero clusters on qcow2 v3, explicit zero data otherwise
 * (v2 images, whose zero writes may leave clusters unallocated when the current backing
 * reads zero). zbuf: at least zbuf_len zero bytes.
 */
int job_write_zeroes_hiding(struct ct_image *img, uint64_t len, uint64_t off, const void *zbuf,
                            size_t zbuf_len);

/* Allocation unit of a qcow2 image (cluster, or subcluster with extended L2); 512 for raw. */
uint64_t job_alloc_unit(struct ct_image *img);

/* Set err for an I/O failure at off of img ("error while WHAT 'file' at offset N: why") and
 * return r; -ECANCELED passes through untouched. */
int job_io_error(struct ct_err *err, int r, const char *what, const struct ct_image *img,
                 uint64_t off);

/* rebase.c: the diff copy behind safe rebase and convert -B. Makes target, which will read
 * through new_top's chain afterwards, show what old_top's chain shows now (NULL = zeros),
 * writing old's bytes only where the views differ, and not into units the target allocates
 * when skip_target_allocated is set. The caller set the progress total. */
struct job_diff {
    struct ct_image *target;
    bool skip_target_allocated;
    struct ct_image *old_top;
    struct ct_image *new_top;
    /* Write data clusters compressed (rebase -c, convert -B -c): whole clusters when the
     * target's allocation unit is its cluster; units smaller than a cluster (extended L2)
     * are written uncompressed. */
    bool compress;
};
struct ct_job;
int job_diff_run(struct ct_job *job, const struct job_diff *d, struct ct_err *err);

/* Aligned scratch buffer (free with free()). */
void *job_buf_alloc(size_t len);

#endif
