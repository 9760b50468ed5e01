/*
 * POSIX files: the only place in the tree that issues storage syscalls.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "io/io.h"
#include "util/err.h"

static int posix_pread(struct ct_file *f, void *buf, size_t len, uint64_t off)
{
    uint8_t *p = buf;
    while (len > 0) {
        ssize_t r = pread(f->fd, p, len, (off_t)off);
        if (r < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -errno;
        }
        if (r == 0) {
            memset(p, 0, len); /* past EOF reads as zeros */
            return 0;
        }
        p += r;
        len -= (size_t)r;
        off += (uint64_t)r;
    }
    return 0;
}

static int posix_pwrite(struct ct_file *f, const void *buf, size_t len, uint64_t off)
{
    const uint8_t *p = buf;
    while (len > 0) {
        ssize_t r = pwrite(f->fd, p, len, (off_t)off);
        if (r < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -errno;
        }
        p += r;
        len -= (size_t)r;
        off += (uint64_t)r;
    }
    return 0;
}

static int posix_flush(struct ct_file *f)
{
    return fdatasync(f->fd) < 0 ? -errno : 0;
}

static void posix_writeback(struct ct_file *f)
{
    /* Whole file (nbytes 0 = to the end): pages already under writeback are skipped. A hint:
     * an error here changes nothing, the caller's flush still reports real failures. */
    (void)sync_file_range(f->fd, 0, 0, SYNC_FILE_RANGE_WRITE);
}

static int posix_truncate(struct ct_file *f, uint64_t size)
{
    return ftruncate(f->fd, (off_t)size) < 0 ? -errno : 0;
}

static int64_t posix_size(struct ct_file *f)
{
    struct stat st;
    if (fstat(f->fd, &st) < 0) {
        return -errno;
    }
    return st.st_size;
}

static int64_t posix_allocated(struct ct_file *f)
{
    struct stat st;
    if (fstat(f->fd, &st) < 0) {
        return -errno;
    }
    return (int64_t)st.st_blocks * 512;
}

static int posix_punch(struct ct_file *f, uint64_t off, uint64_t len)
{
    if (fallocate(f->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len) < 0) {
        return -errno;
    }
    return 0;
}

static int posix_prealloc(struct ct_file *f, uint64_t off, uint64_t len)
{
    int r = posix_fallocate(f->fd, (off_t)off, (off_t)len);
    return -r;
}

static int posix_extent(struct ct_file *f, uint64_t off, uint64_t max, bool *hole, uint64_t *len)
{
    off_t d = lseek(f->fd, (off_t)off, SEEK_DATA);
    if (d < 0 && errno == ENXIO) {
        /* Past the last data: a hole to the end. */
        *hole = true;
        *len = max;
        return 0;
    }
    if (d < 0) {
        /* Filesystem without SEEK_DATA: say data. */
        *hole = false;
        *len = max;
        return 0;
    }
    if ((uint64_t)d > off) {
        *hole = true;
        *len = (uint64_t)d - off < max ? (uint64_t)d - off : max;
        return 0;
    }
    off_t h = lseek(f->fd, (off_t)off, SEEK_HOLE);
    *hole = false;
    *len = h > (off_t)off && (uint64_t)h - off < max ? (uint64_t)h - off : max;
    return 0;
}

static void posix_close(struct ct_file *f)
{
    if (f->fd >= 0) {
        close(f->fd);
    }
}

static const struct ct_file_ops posix_ops = {
    .pread = posix_pread,
    .pwrite = posix_pwrite,
    .flush = posix_flush,
    .truncate = posix_truncate,
    .size = posix_size,
    .allocated = posix_allocated,
    .punch = posix_punch,
    .prealloc = posix_prealloc,
    .extent = posix_extent,
    .writeback = posix_writeback,
    .close = posix_close,
};

int ct_file_open(struct ct_file **out, const char *path, unsigned flags, struct ct_err *err)
{
    *out = NULL;
    int oflags = O_CLOEXEC | ((flags & CT_FILE_WRITE) ? O_RDWR : O_RDONLY);
    if (flags & CT_FILE_CREATE) {
        oflags |= O_CREAT | ((flags & CT_FILE_EXCL) ? O_EXCL : O_TRUNC);
    }
    int fd = open(path, oflags, 0644);
    if (fd < 0) {
        int e = errno;
        return ct_err_set(err, -e, "Could not open '%s': %s", path, strerror(e));
    }
    struct stat st;
    if (fstat(fd, &st) == 0 && S_ISDIR(st.st_mode)) {
        close(fd);
        return ct_err_set(err, -EISDIR, "Could not open '%s': Is a directory", path);
    }
    struct ct_file *f = calloc(1, sizeof(*f));
    char *p = strdup(path);
    if (!f || !p) {
        free(f);
        free(p);
        close(fd);
        return ct_err_set(err, -ENOMEM, "out of memory");
    }
    f->ops = &posix_ops;
    f->fd = fd;
    f->path = p;
    f->writable = (flags & CT_FILE_WRITE) != 0;
    *out = f;
    return 0;
}

int ct_file_copy_range(struct ct_file *src, uint64_t src_off, struct ct_file *dst, uint64_t dst_off,
                       uint64_t len)
{
    if (src->ops != &posix_ops || dst->ops != &posix_ops || src->fd < 0 || dst->fd < 0) {
        return -EOPNOTSUPP;
    }
    int r = ct_fault_check(CT_FAULT_WRITE);
    if (r < 0) {
        return r;
    }
    while (len > 0) {
        loff_t in = (loff_t)src_off, outp = (loff_t)dst_off;
        ssize_t n = copy_file_range(src->fd, &in, dst->fd, &outp, len, 0);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -errno;
        }
        if (n == 0) {
            /* Source shorter than asked: reads past EOF are zeros, which a fresh target
             * already reads; let the caller's fallback write them. */
            return -ENODATA;
        }
        src_off += (uint64_t)n;
        dst_off += (uint64_t)n;
        len -= (uint64_t)n;
        ct_file_note_written(dst, (uint64_t)n);
    }
    return 0;
}

/* QEMU's lock byte layout (block/file-posix.c facts: RAW_LOCK_PERM_BASE 100,
 * RAW_LOCK_SHARED_BASE 200; permission bits consistent-read, write, write-unchanged, resize). */
enum { LOCK_PERM_BASE = 100, LOCK_SHARED_BASE = 200 };
enum { PERM_READ = 0, PERM_WRITE = 1, PERM_WRITE_UNCHANGED = 2, PERM_RESIZE = 3, PERM_COUNT = 4 };
static const char *const perm_names[PERM_COUNT] = {"consistent read", "write", "write unchanged",
                                                   "resize"};

static int lock_byte(int fd, off_t byte, short type)
{
    struct flock fl = {.l_type = type, .l_whence = SEEK_SET, .l_start = byte, .l_len = 1};
    return fcntl(fd, F_OFD_SETLK, &fl) < 0 ? -errno : 0;
}

/* Is byte locked by anyone else (any open file description but ours)? */
static int byte_taken(int fd, off_t byte)
{
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = byte, .l_len = 1};
    if (fcntl(fd, F_OFD_GETLK, &fl) < 0) {
        return -errno;
    }
    return fl.l_type != F_UNLCK;
}

int ct_file_lock(struct ct_file *f, bool write, struct ct_err *err)
{
    if (f->fd < 0) {
        return 0;
    }
    /* What we hold, and what we refuse to share, as QEMU's qcow2-on-file does. */
    unsigned held = 1u << PERM_READ;
    unsigned unshared = 1u << PERM_WRITE | 1u << PERM_RESIZE;
    if (write) {
        held |= 1u << PERM_WRITE | 1u << PERM_RESIZE;
    }
    for (int p = 0; p < PERM_COUNT; p++) {
        int r = 0;
        if (held & (1u << p)) {
            r = lock_byte(f->fd, LOCK_PERM_BASE + p, F_RDLCK);
        }
        if (r == 0 && (unshared & (1u << p))) {
            r = lock_byte(f->fd, LOCK_SHARED_BASE + p, F_RDLCK);
        }
        if (r == -EAGAIN || r == -EACCES) {
            return ct_err_set(err, -CT_E_BUSY, "Failed to lock byte %d of '%s'", LOCK_PERM_BASE + p,
                              f->path);
        }
        if (r < 0) {
            return ct_err_set(err, r, "Failed to lock '%s': %s", f->path, strerror(-r));
        }
    }
    /* Now test: does someone refuse to share a permission we hold, or hold one we refuse? */
    for (int p = 0; p < PERM_COUNT; p++) {
        if (held & (1u << p)) {
            int t = byte_taken(f->fd, LOCK_SHARED_BASE + p);
            if (t > 0) {
                return ct_err_set(err, -CT_E_BUSY,
                                  "Failed to get shared \"%s\" lock on '%s': Is another process "
                                  "using the image?",
                                  perm_names[p], f->path);
            }
        }
        if (unshared & (1u << p)) {
            int t = byte_taken(f->fd, LOCK_PERM_BASE + p);
            if (t > 0) {
                return ct_err_set(err, -CT_E_BUSY,
                                  "Failed to get \"%s\" lock on '%s': Is another process using "
                                  "the image?",
                                  perm_names[p], f->path);
            }
        }
    }
    return 0;
}
