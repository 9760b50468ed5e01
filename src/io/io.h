/*
 * The I/O seam: every byte of image storage goes through struct ct_file. Nothing above this
 * layer calls open/pread/pwrite/fsync directly, so fault injection (io-fault.c) and the
 * in-memory backend (io-mem.c, for fuzzers) see all storage traffic.
 *
 * All calls return >= 0 on success or -errno. Reads past end-of-file return zeros: a qcow2
 * file may end inside its last cluster, and compressed data may be read with slop.
 */
#ifndef CT_IO_H
#define CT_IO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cowtree/cowtree.h"

struct ct_file;

struct ct_file_ops {
    int (*pread)(struct ct_file *f, void *buf, size_t len, uint64_t off);
    int (*pwrite)(struct ct_file *f, const void *buf, size_t len, uint64_t off);
    int (*flush)(struct ct_file *f);
    int (*truncate)(struct ct_file *f, uint64_t size);
    int64_t (*size)(struct ct_file *f);
    int64_t (*allocated)(struct ct_file *f);
    int (*punch)(struct ct_file *f, uint64_t off, uint64_t len);
    int (*prealloc)(struct ct_file *f, uint64_t off, uint64_t len);
    /* Is off in a hole (reads as zero, no storage)? *len = bytes from off of that kind. */
    int (*extent)(struct ct_file *f, uint64_t off, uint64_t max, bool *hole, uint64_t *len);
    /* Start writing the file's dirty pages back, without waiting for them (optional). */
    void (*writeback)(struct ct_file *f);
    void (*close)(struct ct_file *f);
};

struct ct_file {
    const struct ct_file_ops *ops;
    char *path;
    bool writable;
    int fd;        /* -1 for non-posix backends */
    bool no_flush; /* flushes succeed without reaching the storage (CT_OPEN_NO_FLUSH) */
    /* Write-behind (ct_file_set_write_behind): start writeback after this many bytes were
     * written since the last start; 0 = leave it to the kernel. */
    uint64_t write_behind;
    uint64_t unstarted; /* bytes written since writeback was last started (atomic) */
};

enum ct_file_open_flags {
    CT_FILE_WRITE = 1u << 0,
    CT_FILE_CREATE = 1u << 1, /* create or truncate */
    CT_FILE_EXCL = 1u << 2,
};

int ct_file_open(struct ct_file **out, const char *path, unsigned flags, struct ct_err *err);
/* In-memory file over a private copy of data (fuzzers, unit tests). */
int ct_file_open_mem(struct ct_file **out, const void *data, size_t len, bool writable);
void ct_file_close(struct ct_file *f);

int ct_file_pread(struct ct_file *f, void *buf, size_t len, uint64_t off);
int ct_file_pwrite(struct ct_file *f, const void *buf, size_t len, uint64_t off);
int ct_file_flush(struct ct_file *f);
int ct_file_truncate(struct ct_file *f, uint64_t size);
int64_t ct_file_size(struct ct_file *f);
int64_t ct_file_allocated(struct ct_file *f);
int ct_file_punch(struct ct_file *f, uint64_t off, uint64_t len);
int ct_file_prealloc(struct ct_file *f, uint64_t off, uint64_t len);
int ct_file_extent(struct ct_file *f, uint64_t off, uint64_t max, bool *hole, uint64_t *len);
/*
 * Write-behind: once `bytes` have been written through f since the last time, ask the kernel
 * to start writing the file's dirty pages back, without waiting. A long copy that ends in a
 * flush then overlaps its disk writes with the copy instead of leaving them all to the final
 * fdatasync (the kernel alone starts only at its dirty_background threshold, often gigabytes).
 * 0 turns it off. Safe when several threads write through f.
 */
void ct_file_set_write_behind(struct ct_file *f, uint64_t bytes);
/* For backends' writes that bypass ct_file_pwrite (copy_file_range): count them. */
void ct_file_note_written(struct ct_file *f, uint64_t written);
/* Copy len bytes from src at src_off to dst at dst_off inside the kernel (copy_file_range).
 * -EOPNOTSUPP when either file is not a POSIX file; other -errno (-EXDEV, -EINVAL, ...) when
 * the kernel refuses, so callers fall back to pread + pwrite. Counts as one write for fault
 * injection. */
int ct_file_copy_range(struct ct_file *src, uint64_t src_off, struct ct_file *dst, uint64_t dst_off,
                       uint64_t len);

/*
 * Image locking, compatible with QEMU's file-posix locks: OFD read locks on byte 100+p for
 * each permission p held and on byte 200+p for each permission p not shared with others
 * (p: 0 consistent-read, 1 write, 2 write-unchanged, 3 resize). QEMU and cowtree thus refuse
 * each other's conflicting opens. Returns 0, -CT_E_BUSY with a message, or -errno.
 */
int ct_file_lock(struct ct_file *f, bool write, struct ct_err *err);

/* Fault injection hook (io-fault.c); returns 0 or the -errno to inject for this call. */
enum ct_fault_op { CT_FAULT_WRITE, CT_FAULT_FLUSH };
int ct_fault_check(enum ct_fault_op op);

#endif
