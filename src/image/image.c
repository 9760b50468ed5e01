/*
 * Generic image layer; see image.h for the invariants it keeps.
 */
#include <errno.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "image/image.h"
#include "util/err.h"
#include "util/misc.h"

#define DEFAULT_MAX_CHAIN_DEPTH 1024

static const struct ct_driver *find_driver(const char *name)
{
    if (strcmp(name, "qcow2") == 0) {
        return &ct_qcow2_driver;
    }
    if (strcmp(name, "raw") == 0) {
        return &ct_raw_driver;
    }
    return NULL;
}

char *image_resolve_backing(const char *overlay, const char *backing)
{
    if (backing[0] == '/') {
        return strdup(backing);
    }
    char *copy = strdup(overlay);
    if (!copy) {
        return NULL;
    }
    const char *dir = dirname(copy);
    char *out = NULL;
    if (strcmp(dir, ".") == 0) {
        out = strdup(backing);
    } else if (asprintf(&out, "%s/%s", dir, backing) < 0) {
        out = NULL;
    }
    free(copy);
    return out;
}

/* Backing names that would make us open something other than a plain file are refused:
 * json: pseudo-filenames and protocol URLs (a security policy, docs/security.md). */
static bool backing_name_is_pseudo(const char *name)
{
    return strncmp(name, "json:", 5) == 0 || strstr(name, "://") != NULL;
}

/* Does path resolve into one of the colon-separated directories? */
static bool backing_allowed(const char *path, const char *dirs)
{
    char *real = realpath(path, NULL);
    if (!real) {
        return false; /* a missing file fails later with its own error; refuse here */
    }
    bool ok = false;
    char *copy = strdup(dirs), *save = NULL;
    for (char *d = copy ? strtok_r(copy, ":", &save) : NULL; d && !ok;
         d = strtok_r(NULL, ":", &save)) {
        char *rd = realpath(d, NULL);
        if (rd) {
            size_t n = strlen(rd);
            ok = strncmp(real, rd, n) == 0 && (real[n] == '/' || (n == 1 && rd[0] == '/'));
            free(rd);
        }
    }
    free(copy);
    free(real);
    return ok;
}

struct chain_id {
    dev_t dev;
    ino_t ino;
};

static void image_free(struct ct_image *img)
{
    image_index_free(img);
    ct_file_close(img->file);
    free(img->filename);
    free(img->backing_name);
    free(img->backing_format);
    free(img->backing_path);
    free(img);
}

static int open_one(struct ct_image **out, const char *path, const char *format, unsigned flags,
                    unsigned depth, unsigned max_depth, struct chain_id *ids,
                    const struct ct_open_opts *opts, struct ct_err *err);

static int open_backing(struct ct_image *img, unsigned max_depth, struct chain_id *ids,
                        const struct ct_open_opts *opts, struct ct_err *err)
{
    if (!img->backing_name || (img->flags & CT_OPEN_NO_BACKING)) {
        return 0;
    }
    if (backing_name_is_pseudo(img->backing_name)) {
        return ct_err_set(err, -CT_E_UNSUPPORTED,
                          "backing file name '%s' is a pseudo-filename or protocol; only plain "
                          "files are allowed",
                          img->backing_name);
    }
    if (!img->backing_format) {
        return ct_err_set(err, -CT_E_UNSUPPORTED,
                          "backing file '%s' has no recorded format; cowtree never probes a "
                          "backing file's format (set it with: cowtree-img rebase -u -b '%s' -F "
                          "FMT)",
                          img->backing_name, img->backing_name);
    }
    if (!find_driver(img->backing_format)) {
        return ct_err_set(err, -CT_E_UNSUPPORTED, "backing file '%s' has unknown format '%s'",
                          img->backing_name, img->backing_format);
    }
    if (img->depth + 1 >= max_depth) {
        return ct_err_set(err, -ELOOP, "backing chain is deeper than the limit of %u images",
                          max_depth);
    }
    img->backing_path = image_resolve_backing(img->filename, img->backing_name);
    if (!img->backing_path) {
        return ct_err_set(err, -ENOMEM, "out of memory");
    }
    if (opts->backing_dirs && !backing_allowed(img->backing_path, opts->backing_dirs)) {
        return ct_err_set(err, -EACCES, "backing file '%s' is outside the allowed directories (%s)",
                          img->backing_path, opts->backing_dirs);
    }
    unsigned bflags = (img->flags & (CT_OPEN_FORCE_SHARE | CT_OPEN_NO_BACKING));
    int r = open_one(&img->backing, img->backing_path, img->backing_format, bflags, img->depth + 1,
                     max_depth, ids, opts, err);
    if (r < 0 && img->depth == 0) {
        /* Deeper levels' messages already name the file that failed. */
        ct_err_prefix(err, "Could not open backing file: ");
    }
    return r;
}

static int open_one(struct ct_image **out, const char *path, const char *format, unsigned flags,
                    unsigned depth, unsigned max_depth, struct chain_id *ids,
                    const struct ct_open_opts *opts, struct ct_err *err)
{
    *out = NULL;
    bool write = (flags & CT_OPEN_WRITE) != 0;
    struct ct_image *img = calloc(1, sizeof(*img));
    if (!img) {
        return ct_err_set(err, -ENOMEM, "out of memory");
    }
    img->flags = flags;
    img->writable = write;
    img->depth = depth;
    img->cache_bytes = opts->cache_bytes;
    img->snapshot = depth == 0 ? opts->snapshot : NULL;
    img->filename = strdup(path);
    int r;
    if (!img->filename) {
        r = ct_err_set(err, -ENOMEM, "out of memory");
        goto fail;
    }
    r = ct_file_open(&img->file, path, write ? CT_FILE_WRITE : 0, err);
    if (r < 0) {
        goto fail;
    }
    img->file->no_flush = (flags & CT_OPEN_NO_FLUSH) != 0;
    if (img->file->fd >= 0) {
        struct stat st;
        if (fstat(img->file->fd, &st) == 0) {
            for (unsigned i = 0; i < depth; i++) {
                if (ids[i].dev == st.st_dev && ids[i].ino == st.st_ino) {
                    r = ct_err_set(err, -ELOOP, "backing chain loop: '%s' is already in the chain",
                                   path);
                    goto fail;
                }
            }
            ids[depth].dev = st.st_dev;
            ids[depth].ino = st.st_ino;
        }
    }
    if (!(flags & CT_OPEN_FORCE_SHARE)) {
        r = ct_file_lock(img->file, write, err);
        if (r < 0) {
            goto fail;
        }
    }
    if (!format) {
        uint8_t magic[4] = {0};
        r = ct_file_pread(img->file, magic, sizeof(magic), 0);
        if (r < 0) {
            ct_err_set(err, r, "Could not read '%s': %s", path, ct_strerror(r));
            goto fail;
        }
        /* Probing is allowed for the image the user names, never for backing files (I2). */
        format = memcmp(magic, "QFI\xfb", 4) == 0 ? "qcow2" : "raw";
    }
    img->drv = find_driver(format);
    if (!img->drv) {
        r = ct_err_set(err, -CT_E_UNSUPPORTED, "Unknown image format '%s'", format);
        goto fail;
    }
    r = img->drv->open(img, err);
    if (r < 0) {
        img->drv = NULL;
        goto fail;
    }
    img->snapshot = NULL;
    r = open_backing(img, max_depth, ids, opts, err);
    if (r == 0 && img->drv->post_open) {
        r = img->drv->post_open(img, err);
    }
    if (r < 0) {
        ct_image_close(img, NULL);
        return r;
    }
    *out = img;
    return 0;
fail:
    image_free(img);
    return r;
}

int ct_image_open(struct ct_image **out, const char *path, const struct ct_open_opts *opts,
                  struct ct_err *err)
{
    static const struct ct_open_opts defaults;
    if (!opts) {
        opts = &defaults;
    }
    unsigned max_depth = opts->max_chain_depth ? opts->max_chain_depth : DEFAULT_MAX_CHAIN_DEPTH;
    struct chain_id *ids = calloc(max_depth + 1, sizeof(*ids));
    if (!ids) {
        return ct_err_set(err, -ENOMEM, "out of memory");
    }
    unsigned flags = opts->flags;
    if (flags & CT_OPEN_FORCE_SHARE) {
        flags &= ~(unsigned)CT_OPEN_WRITE;
    }
    int r = open_one(out, path, opts->format, flags, 0, max_depth, ids, opts, err);
    free(ids);
    return r;
}

int ct_image_close(struct ct_image *img, struct ct_err *err)
{
    int ret = 0;
    while (img) {
        struct ct_image *next = img->backing;
        if (img->drv) {
            int r = img->drv->close(img);
            if (r < 0 && ret == 0) {
                ret = ct_err_set(err, r, "%s: flush on close failed: %s", img->filename,
                                 ct_strerror(r));
            }
        }
        image_free(img);
        img = next;
    }
    return ret;
}

uint64_t ct_image_size(const struct ct_image *img)
{
    return img->size;
}

const char *ct_image_filename(const struct ct_image *img)
{
    return img->filename;
}

const char *ct_image_format(const struct ct_image *img)
{
    return img->drv->name;
}

struct ct_image *ct_image_backing(const struct ct_image *img)
{
    return img->backing;
}

struct ct_image *ct_image_swap_backing(struct ct_image *img, struct ct_image *backing)
{
    image_chain_changed();
    struct ct_image *old = img->backing;
    img->backing = backing;
    unsigned d = img->depth + 1;
    for (struct ct_image *l = backing; l; l = l->backing) {
        l->depth = d++;
    }
    d = 0;
    for (struct ct_image *l = old; l; l = l->backing) {
        l->depth = d++;
    }
    return old;
}

/* The driver of a layer that lost its file in a failed reopen: every request fails. */
static int dead_open(struct ct_image *img, struct ct_err *err)
{
    (void)img;
    return ct_err_set(err, -EIO, "image lost in a failed reopen");
}
static int dead_close(struct ct_image *img)
{
    (void)img;
    return 0;
}
static int dead_pread(struct ct_image *img, void *buf, uint64_t len, uint64_t off)
{
    (void)img, (void)buf, (void)len, (void)off;
    return -EIO;
}
static int dead_pwrite(struct ct_image *img, const void *buf, uint64_t len, uint64_t off)
{
    (void)img, (void)buf, (void)len, (void)off;
    return -EIO;
}
static int dead_zeroes(struct ct_image *img, uint64_t len, uint64_t off, unsigned flags)
{
    (void)img, (void)len, (void)off, (void)flags;
    return -EIO;
}
static int dead_discard(struct ct_image *img, uint64_t len, uint64_t off)
{
    (void)img, (void)len, (void)off;
    return -EIO;
}
static int dead_flush(struct ct_image *img)
{
    (void)img;
    return -EIO;
}
static int dead_status(struct ct_image *img, uint64_t off, uint64_t len, struct ct_extent *out)
{
    (void)img, (void)off, (void)len, (void)out;
    return -EIO;
}
static int dead_truncate(struct ct_image *img, uint64_t size, bool shrink, struct ct_err *err)
{
    (void)img, (void)size, (void)shrink;
    return ct_err_set(err, -EIO, "image lost in a failed reopen");
}
static int dead_info(struct ct_image *img, struct ct_image_info *info)
{
    (void)img, (void)info;
    return -EIO;
}
static int dead_check(struct ct_image *img, unsigned fix, struct ct_check_result *res,
                      ct_check_report_fn report, void *opaque, struct ct_err *err)
{
    (void)img, (void)fix, (void)res, (void)report, (void)opaque;
    return ct_err_set(err, -EIO, "image lost in a failed reopen");
}
static const struct ct_driver dead_driver = {
    .name = "lost",
    .open = dead_open,
    .close = dead_close,
    .pread = dead_pread,
    .pwrite = dead_pwrite,
    .pwrite_zeroes = dead_zeroes,
    .discard = dead_discard,
    .flush = dead_flush,
    .block_status = dead_status,
    .truncate = dead_truncate,
    .info = dead_info,
    .check = dead_check,
};

/* Open img's file again in the mode `writable` and parse it with drv (backing chain kept). */
static int reopen_as(struct ct_image *img, const struct ct_driver *drv, bool writable,
                     struct ct_err *err)
{
    int r = ct_file_open(&img->file, img->filename, writable ? CT_FILE_WRITE : 0, err);
    if (r < 0) {
        img->file = NULL;
        return r;
    }
    img->file->no_flush = (img->flags & CT_OPEN_NO_FLUSH) != 0;
    if (!(img->flags & CT_OPEN_FORCE_SHARE)) {
        r = ct_file_lock(img->file, writable, err);
    }
    img->writable = writable;
    img->flags = writable ? img->flags | CT_OPEN_WRITE : img->flags & ~(unsigned)CT_OPEN_WRITE;
    free(img->backing_name);
    free(img->backing_format);
    img->backing_name = img->backing_format = NULL;
    if (r == 0) {
        img->drv = drv;
        r = drv->open(img, err);
        if (r < 0) {
            img->drv = NULL;
        }
    }
    if (r == 0 && drv->post_open) {
        r = drv->post_open(img, err);
        if (r < 0) {
            drv->close(img);
            img->drv = NULL;
        }
    }
    if (r < 0) {
        ct_file_close(img->file);
        img->file = NULL;
    }
    return r;
}

int ct_image_reopen(struct ct_image *img, bool writable, struct ct_err *err)
{
    if (img->writable == writable) {
        return 0;
    }
    if (writable && (img->flags & CT_OPEN_FORCE_SHARE)) {
        return ct_err_set(err, -EINVAL, "%s: opened with force-share, cannot be made writable",
                          img->filename);
    }
    if (img->drv == &dead_driver) {
        return ct_err_set(err, -EIO, "%s: image lost in a failed reopen", img->filename);
    }
    const struct ct_driver *drv = img->drv;
    bool was = img->writable;
    image_chain_changed();
    /* Going read-only: close flushes and clears the dirty bit; a failure keeps the mode. */
    int r = drv->close(img);
    if (r < 0) {
        ct_err_set(err, r, "%s: flush before reopen failed: %s", img->filename, ct_strerror(r));
    }
    ct_file_close(img->file);
    img->file = NULL;
    if (r == 0) {
        r = reopen_as(img, drv, writable, err);
        if (r == 0) {
            return 0;
        }
        ct_err_prefix(err, "Could not reopen '%s' %s: ", img->filename,
                      writable ? "read-write" : "read-only");
    }
    struct ct_err back = {0};
    if (reopen_as(img, drv, was, &back) == 0) {
        return r;
    }
    img->drv = &dead_driver;
    img->drv_state = NULL;
    image_poison(img, -EIO);
    snprintf(img->poison_msg, sizeof(img->poison_msg), "%.200s: lost in a failed reopen: %.250s",
             img->filename, back.msg);
    return r;
}

const char *ct_image_last_error(const struct ct_image *img)
{
    for (const struct ct_image *l = img; l; l = l->backing) {
        if (l->poison_msg[0]) {
            return l->poison_msg;
        }
    }
    return NULL;
}

int image_poison(struct ct_image *img, int err)
{
    if (img->poison == 0) {
        img->poison = err;
        if (img->depth > 0) {
            image_chain_changed(); /* indexes stop reading its data directly (X4) */
        }
    }
    return err;
}

int image_read_below(struct ct_image *img, void *buf, uint64_t len, uint64_t off)
{
    struct ct_image *b = img->backing;
    uint64_t n = 0;
    if (b && off < b->size) {
        n = CT_MIN(len, b->size - off);
        int r = image_read_below_indexed(img, buf, n, off);
        if (r < 0) {
            return r;
        }
    }
    if (n < len) {
        memset((uint8_t *)buf + n, 0, len - n);
    }
    return 0;
}

bool image_below_is_zero(struct ct_image *img, uint64_t len, uint64_t off)
{
    struct ct_image *b = img->backing;
    while (b) {
        if (off >= b->size) {
            return true;
        }
        uint64_t end = CT_MIN(off + len, b->size);
        for (uint64_t o = off; o < end;) {
            struct ct_extent e;
            if (ct_image_block_status(b, o, end - o, &e) < 0 || e.len == 0) {
                return false;
            }
            if ((e.flags & CT_STATUS_ALLOCATED) && !(e.flags & CT_STATUS_ZERO)) {
                return false;
            }
            if (!(e.flags & CT_STATUS_ALLOCATED) && !image_below_is_zero(b, e.len, o)) {
                return false;
            }
            o += e.len;
        }
        return true;
    }
    return true;
}

static int check_range(struct ct_image *img, uint64_t len, uint64_t off)
{
    if (off > img->size || len > img->size - off) {
        return -EINVAL;
    }
    return 0;
}

/* img is about to change what it reads: if it is a backing layer, indexes are stale (X1). */
static void image_mutating(const struct ct_image *img)
{
    if (img->depth > 0) {
        image_chain_changed();
    }
}

static int check_write(struct ct_image *img, uint64_t len, uint64_t off)
{
    if (!img->writable) {
        return -EROFS;
    }
    if (img->poison) {
        return -CT_E_STATE;
    }
    image_mutating(img);
    return check_range(img, len, off);
}

int ct_image_pread(struct ct_image *img, void *buf, uint64_t len, uint64_t off)
{
    int r = check_range(img, len, off);
    if (r < 0 || len == 0) {
        return r;
    }
    return img->drv->pread(img, buf, len, off);
}

static int maybe_fua(struct ct_image *img, int r, unsigned flags)
{
    if (r >= 0 && ((flags & CT_WRITE_FUA) || (img->flags & CT_OPEN_WRITETHROUGH))) {
        r = img->drv->flush(img);
    }
    return r;
}

int ct_image_pwrite(struct ct_image *img, const void *buf, uint64_t len, uint64_t off,
                    unsigned flags)
{
    int r = check_write(img, len, off);
    if (r < 0 || len == 0) {
        return r;
    }
    return maybe_fua(img, img->drv->pwrite(img, buf, len, off), flags);
}

int ct_image_pwrite_zeroes(struct ct_image *img, uint64_t len, uint64_t off, unsigned flags)
{
    int r = check_write(img, len, off);
    if (r < 0 || len == 0) {
        return r;
    }
    return maybe_fua(img, img->drv->pwrite_zeroes(img, len, off, flags), flags);
}

int ct_image_discard(struct ct_image *img, uint64_t len, uint64_t off)
{
    int r = check_write(img, len, off);
    if (r < 0 || len == 0) {
        return r;
    }
    return maybe_fua(img, img->drv->discard(img, len, off), 0);
}

int ct_image_flush(struct ct_image *img)
{
    if (!img->writable) {
        return 0;
    }
    if (img->poison) {
        return -CT_E_STATE;
    }
    return img->drv->flush(img);
}

int ct_image_truncate(struct ct_image *img, uint64_t new_size, bool allow_shrink,
                      struct ct_err *err)
{
    if (!img->writable) {
        return ct_err_set(err, -EROFS, "image is read-only");
    }
    if (img->poison) {
        return ct_err_set(err, -CT_E_STATE, "image handle is in an error state");
    }
    if (new_size < img->size && !allow_shrink) {
        return ct_err_set(err, -EINVAL, "Use the --shrink option to perform a shrink operation.");
    }
    image_mutating(img);
    return img->drv->truncate(img, new_size, allow_shrink, err);
}

int ct_image_block_status(struct ct_image *img, uint64_t off, uint64_t len, struct ct_extent *out)
{
    memset(out, 0, sizeof(*out));
    if (off >= img->size) {
        return 0;
    }
    len = CT_MIN(len, img->size - off);
    if (len == 0) {
        return 0;
    }
    return img->drv->block_status(img, off, len, out);
}

int ct_image_map(struct ct_image *img, uint64_t off, uint64_t len, struct ct_map_extent *out)
{
    memset(out, 0, sizeof(*out));
    if (off >= img->size) {
        return 0;
    }
    len = CT_MIN(len, img->size - off);
    unsigned depth = 0;
    struct ct_image *layer = img;
    for (;;) {
        struct ct_extent e;
        if (off >= layer->size) {
            /* Past the end of a shorter backing file: reads as zero, provided by nobody. */
            out->off = off;
            out->len = len;
            out->flags = CT_STATUS_ZERO;
            out->depth = depth - 1;
            out->layer = layer;
            return 0;
        }
        int r = ct_image_block_status(layer, off, len, &e);
        if (r < 0) {
            return r;
        }
        len = e.len;
        if ((e.flags & CT_STATUS_ALLOCATED) || !layer->backing) {
            out->off = off;
            out->len = len;
            out->flags = e.flags;
            if (!(e.flags & CT_STATUS_ALLOCATED)) {
                out->flags |= CT_STATUS_ZERO;
            }
            out->depth = depth;
            out->host_off = e.host_off;
            out->layer = layer;
            return 0;
        }
        layer = layer->backing;
        depth++;
    }
}

int ct_image_info(struct ct_image *img, struct ct_image_info *info)
{
    memset(info, 0, sizeof(*info));
    info->filename = img->filename;
    info->format = img->drv->name;
    info->virtual_size = img->size;
    int64_t a = ct_file_allocated(img->file);
    info->actual_size = a > 0 ? (uint64_t)a : 0;
    info->backing_file = img->backing_name;
    info->backing_format = img->backing_format;
    info->full_backing_file = img->backing_path;
    if (img->backing_name && !info->full_backing_file) {
        /* Not opened (-u, or NO_BACKING): still report where it would be. */
        img->backing_path = image_resolve_backing(img->filename, img->backing_name);
        info->full_backing_file = img->backing_path;
    }
    return img->drv->info ? img->drv->info(img, info) : 0;
}

int ct_image_check(struct ct_image *img, unsigned fix, struct ct_check_result *res,
                   ct_check_report_fn report, void *opaque, struct ct_err *err)
{
    memset(res, 0, sizeof(*res));
    if (!img->drv->check) {
        return ct_err_set(err, -CT_E_UNSUPPORTED, "This image format does not support checks");
    }
    if (fix && !img->writable) {
        return ct_err_set(err, -EROFS, "cannot repair a read-only image");
    }
    if (fix) {
        image_mutating(img);
    }
    return img->drv->check(img, fix, res, report, opaque, err);
}

/* ---- internal snapshots: qcow2 only ---- */

#include "qcow2/qcow2.h"

static struct qcow2_state *snapshot_state(struct ct_image *img, bool write, struct ct_err *err)
{
    if (img->drv != &ct_qcow2_driver) {
        ct_err_set(err, -CT_E_UNSUPPORTED, "internal snapshots need a qcow2 image");
        return NULL;
    }
    if (write && !img->writable) {
        ct_err_set(err, -EROFS, "image is open read-only");
        return NULL;
    }
    if (write && img->poison) {
        ct_err_set(err, -CT_E_STATE, "image handle is in an error state");
        return NULL;
    }
    return qstate(img);
}

int ct_snapshot_count(struct ct_image *img)
{
    return img->drv == &ct_qcow2_driver ? (int)qstate(img)->nb_snapshots : 0;
}

int ct_snapshot_get(struct ct_image *img, unsigned index, struct ct_snapshot_info *out)
{
    if (img->drv != &ct_qcow2_driver || index >= qstate(img)->nb_snapshots) {
        return -ENOENT;
    }
    const struct qcow2_snapshot *s = &qstate(img)->snapshots[index];
    out->id = s->id;
    out->name = s->name;
    out->vm_state_size = s->vm_state_size;
    out->date_sec = s->date_sec;
    out->date_nsec = s->date_nsec;
    out->vm_clock_nsec = s->vm_clock_nsec;
    out->disk_size = s->disk_size;
    out->icount = s->icount;
    return 0;
}

int ct_snapshot_find(struct ct_image *img, const char *name_or_id, struct ct_err *err)
{
    struct qcow2_state *q = snapshot_state(img, false, err);
    return q ? qcow2_snapshot_find(q, name_or_id, err) : (err ? err->code : -CT_E_UNSUPPORTED);
}

int ct_snapshot_create(struct ct_image *img, const char *name,
                       const struct ct_snapshot_create_opts *opts, struct ct_err *err)
{
    struct qcow2_state *q = snapshot_state(img, true, err);
    return q ? qcow2_snapshot_create(q, name, opts, err) : err ? err->code : -EINVAL;
}

int ct_snapshot_apply(struct ct_image *img, const char *name_or_id, struct ct_err *err)
{
    image_mutating(img);
    struct qcow2_state *q = snapshot_state(img, true, err);
    return q ? qcow2_snapshot_apply(q, name_or_id, err) : err ? err->code : -EINVAL;
}

int ct_snapshot_delete(struct ct_image *img, const char *name_or_id, struct ct_err *err)
{
    struct qcow2_state *q = snapshot_state(img, true, err);
    return q ? qcow2_snapshot_delete(q, name_or_id, err) : err ? err->code : -EINVAL;
}

int ct_snapshot_read_vmstate(struct ct_image *img, const char *name_or_id, void *buf, uint64_t len,
                             uint64_t off, struct ct_err *err)
{
    struct qcow2_state *q = snapshot_state(img, false, err);
    return q     ? qcow2_snapshot_read_vmstate(q, name_or_id, buf, len, off, err)
           : err ? err->code
                 : -EINVAL;
}

int ct_image_change_backing(struct ct_image *img, const char *backing, const char *fmt,
                            struct ct_err *err)
{
    struct qcow2_state *q = snapshot_state(img, true, err);
    if (!q) {
        return err ? err->code : -EINVAL;
    }
    if (backing && !*backing) {
        backing = NULL;
    }
    if (backing && (!fmt || (strcmp(fmt, "qcow2") != 0 && strcmp(fmt, "raw") != 0))) {
        return ct_err_set(err, -EINVAL, "backing format must be given as qcow2 or raw");
    }
    if (backing && strlen(backing) > QCOW2_MAX_BACKING_NAME) {
        return ct_err_set(err, -EINVAL, "backing file name is longer than 1023 bytes");
    }
    char *nb = backing ? strdup(backing) : NULL, *nf = backing ? strdup(fmt) : NULL;
    if (backing && (!nb || !nf)) {
        free(nb);
        free(nf);
        return ct_err_set(err, -ENOMEM, "out of memory");
    }
    char *ob = img->backing_name, *of = img->backing_format;
    img->backing_name = nb;
    img->backing_format = nf;
    int r = qcow2_mark_dirty(q);
    if (r == 0) {
        r = qcow2_flush_metadata(q);
    }
    if (r == 0) {
        r = qcow2_rewrite_header(q);
    }
    if (r == 0) {
        r = qcow2_barrier(q);
    }
    if (r < 0) {
        img->backing_name = ob;
        img->backing_format = of;
        free(nb);
        free(nf);
        return ct_err_set(err, r, "could not rewrite the header: %s", ct_strerror(r));
    }
    free(ob);
    free(of);
    free(img->backing_path);
    img->backing_path = NULL;
    return 0;
}

int ct_image_make_empty(struct ct_image *img, struct ct_err *err)
{
    image_mutating(img);
    struct qcow2_state *q = snapshot_state(img, true, err);
    if (!q) {
        return err ? err->code : -EINVAL;
    }
    int r = qcow2_mark_dirty(q);
    uint64_t span = q->cluster_size * q->l2_entries;
    if (r == 0) {
        r = qcow2_discard_range(q, 0, (uint64_t)q->l1_size * span, true);
    }
    if (r == 0) {
        r = qcow2_flush_metadata(q);
    }
    return r < 0 ? ct_err_set(err, r, "could not empty the image: %s", ct_strerror(r)) : 0;
}

void ct_image_set_write_behind(struct ct_image *img, uint64_t bytes)
{
    if (img->file) {
        ct_file_set_write_behind(img->file, bytes);
    }
}

int ct_image_copy_range(struct ct_image *src, uint64_t src_off, struct ct_image *dst,
                        uint64_t dst_off, uint64_t len)
{
    int r = check_range(src, len, src_off);
    if (r == 0) {
        r = check_write(dst, len, dst_off);
    }
    if (r < 0 || len == 0) {
        return r;
    }
    if (src->drv != &ct_raw_driver || dst->drv != &ct_raw_driver) {
        return -EOPNOTSUPP;
    }
    return maybe_fua(dst, ct_file_copy_range(src->file, src_off, dst->file, dst_off, len), 0);
}

uint64_t ct_image_cluster_size(const struct ct_image *img)
{
    return img->drv == &ct_qcow2_driver ? qstate((struct ct_image *)img)->cluster_size : 0;
}

int ct_image_pwrite_compressed(struct ct_image *img, const void *buf, uint64_t len, uint64_t off)
{
    int r = check_write(img, len, off);
    if (r < 0) {
        return r;
    }
    if (img->drv != &ct_qcow2_driver) {
        return -CT_E_UNSUPPORTED;
    }
    struct qcow2_state *q = qstate(img);
    if ((off & (q->cluster_size - 1)) || (len != q->cluster_size && off + len != img->size) ||
        len > q->cluster_size) {
        return -EINVAL;
    }
    if (len == q->cluster_size) {
        return qcow2_pwrite_compressed(q, buf, off);
    }
    uint8_t *full = calloc(1, q->cluster_size);
    if (!full) {
        return -ENOMEM;
    }
    memcpy(full, buf, len);
    r = qcow2_pwrite_compressed(q, full, off);
    free(full);
    return r;
}

int ct_snapshot_diff(struct ct_image *img, const char *from, const char *to, ct_extent_fn fn,
                     void *opaque, struct ct_err *err)
{
    struct qcow2_state *q = snapshot_state(img, false, err);
    return q ? qcow2_snapshot_diff(q, from, to, fn, opaque, err) : err ? err->code : -EINVAL;
}

int ct_image_compact(struct ct_image *img, struct ct_compact_result *res, struct ct_err *err)
{
    struct qcow2_state *q = snapshot_state(img, true, err);
    memset(res, 0, sizeof(*res));
    if (!q) {
        return err ? err->code : -EINVAL;
    }
    int64_t s = ct_file_size(img->file), a = ct_file_allocated(img->file);
    res->file_size_before = s > 0 ? (uint64_t)s : 0;
    res->allocated_before = a > 0 ? (uint64_t)a : 0;
    uint64_t end = 0;
    image_mutating(img); /* data moves: host offsets in chain indexes go stale (X4) */
    int r = qcow2_compact(q, &res->clusters_moved, &end);
    if (r < 0) {
        return ct_err_set(err, r, "compaction failed: %s", ct_strerror(r));
    }
    s = ct_file_size(img->file);
    a = ct_file_allocated(img->file);
    res->file_size_after = s > 0 ? (uint64_t)s : 0;
    res->allocated_after = a > 0 ? (uint64_t)a : 0;
    return 0;
}

int ct_image_amend(struct ct_image *img, int compat, int lazy_refcounts, struct ct_err *err)
{
    struct qcow2_state *q = snapshot_state(img, true, err);
    if (!q) {
        return err ? err->code : -EINVAL;
    }
    image_mutating(img); /* a downgrade rewrites zero clusters */
    return qcow2_amend(q, compat, lazy_refcounts, err);
}
