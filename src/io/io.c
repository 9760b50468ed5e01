/*
 * Dispatch through the backend's ops with the fault-injection hook in front of every
 * mutating call. The hook costs one predictable branch when injection is off.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "io/io.h"

int ct_file_pread(struct ct_file *f, void *buf, size_t len, uint64_t off)
{
    return f->ops->pread(f, buf, len, off);
}

void ct_file_note_written(struct ct_file *f, uint64_t written)
{
    uint64_t limit = __atomic_load_n(&f->write_behind, __ATOMIC_RELAXED);
    if (limit == 0 || !f->ops->writeback || f->no_flush) {
        return;
    }
    uint64_t n = __atomic_add_fetch(&f->unstarted, written, __ATOMIC_RELAXED);
    /* One of the writers that crossed the limit starts writeback; the others go on. */
    if (n >= limit && __atomic_compare_exchange_n(&f->unstarted, &n, 0, false, __ATOMIC_RELAXED,
                                                  __ATOMIC_RELAXED)) {
        f->ops->writeback(f);
    }
}

int ct_file_pwrite(struct ct_file *f, const void *buf, size_t len, uint64_t off)
{
    int r = ct_fault_check(CT_FAULT_WRITE);
    if (r == 0) {
        r = f->ops->pwrite(f, buf, len, off);
    }
    if (r == 0) {
        ct_file_note_written(f, len);
    }
    return r;
}

void ct_file_set_write_behind(struct ct_file *f, uint64_t bytes)
{
    __atomic_store_n(&f->write_behind, bytes, __ATOMIC_RELAXED);
    __atomic_store_n(&f->unstarted, 0, __ATOMIC_RELAXED);
}

int ct_file_flush(struct ct_file *f)
{
    if (f->no_flush) {
        return 0;
    }
    int r = ct_fault_check(CT_FAULT_FLUSH);
    return r < 0 ? r : f->ops->flush(f);
}

int ct_file_truncate(struct ct_file *f, uint64_t size)
{
    int r = ct_fault_check(CT_FAULT_WRITE);
    return r < 0 ? r : f->ops->truncate(f, size);
}

int64_t ct_file_size(struct ct_file *f)
{
    return f->ops->size(f);
}

int64_t ct_file_allocated(struct ct_file *f)
{
    return f->ops->allocated(f);
}

int ct_file_punch(struct ct_file *f, uint64_t off, uint64_t len)
{
    int r = ct_fault_check(CT_FAULT_WRITE);
    return r < 0 ? r : f->ops->punch(f, off, len);
}

int ct_file_prealloc(struct ct_file *f, uint64_t off, uint64_t len)
{
    int r = ct_fault_check(CT_FAULT_WRITE);
    return r < 0 ? r : f->ops->prealloc(f, off, len);
}

void ct_file_close(struct ct_file *f)
{
    if (f) {
        f->ops->close(f);
        free(f->path);
        free(f);
    }
}

int ct_file_extent(struct ct_file *f, uint64_t off, uint64_t max, bool *hole, uint64_t *len)
{
    if (!f->ops->extent) {
        *hole = false;
        *len = max;
        return 0;
    }
    return f->ops->extent(f, off, max, hole, len);
}
