/*
 * ct_image_create: option validation shared by every format, backing-file checks, then the
 * format's own creation.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "image/image.h"
#include "util/err.h"

int qcow2_create(const char *path, const struct ct_create_opts *o, uint64_t size,
                 struct ct_err *err);

static int create_raw(const char *path, const struct ct_create_opts *o, struct ct_err *err)
{
    if (o->backing_file) {
        return ct_err_set(err, -EINVAL, "raw images cannot have a backing file");
    }
    struct ct_file *f;
    int r = ct_file_open(&f, path, CT_FILE_WRITE | CT_FILE_CREATE, err);
    if (r < 0) {
        return r;
    }
    r = ct_file_truncate(f, o->size);
    if (r == 0 && (o->prealloc == CT_PREALLOC_FALLOC || o->prealloc == CT_PREALLOC_FULL) &&
        o->size) {
        r = ct_file_prealloc(f, 0, o->size);
    }
    if (r == 0) {
        r = ct_file_flush(f);
    }
    ct_file_close(f);
    return r < 0 ? ct_err_set(err, r, "Could not create '%s': %s", path, ct_strerror(r)) : 0;
}

int ct_image_create(const char *path, const struct ct_create_opts *o, struct ct_err *err)
{
    const char *fmt = o->format ? o->format : "qcow2";
    if (strcmp(fmt, "raw") == 0) {
        return create_raw(path, o, err);
    }
    if (strcmp(fmt, "qcow2") != 0) {
        return ct_err_set(err, -CT_E_UNSUPPORTED, "Unknown file format '%s'", fmt);
    }
    uint64_t size = o->size;
    if (o->backing_file) {
        if (!o->backing_format) {
            return ct_err_set(err, -EINVAL,
                              "Backing file specified without backing format (use -F FMT)");
        }
        if (strcmp(o->backing_format, "qcow2") != 0 && strcmp(o->backing_format, "raw") != 0) {
            return ct_err_set(err, -CT_E_UNSUPPORTED, "Unknown backing file format '%s'",
                              o->backing_format);
        }
        if (!o->no_open_backing) {
            char *bpath = image_resolve_backing(path, o->backing_file);
            if (!bpath) {
                return ct_err_set(err, -ENOMEM, "out of memory");
            }
            struct ct_image *b;
            struct ct_open_opts bo = {.format = o->backing_format, .flags = CT_OPEN_FORCE_SHARE};
            int r = ct_image_open(&b, bpath, &bo, err);
            free(bpath);
            if (r < 0) {
                ct_err_prefix(err, "Could not open backing image: ");
                return r;
            }
            if (!o->size_given) {
                size = ct_image_size(b);
            }
            ct_image_close(b, NULL);
        } else if (!o->size_given) {
            return ct_err_set(err, -EINVAL,
                              "Image size must be specified when the backing file is not opened "
                              "(-u)");
        }
    } else if (!o->size_given) {
        return ct_err_set(err, -EINVAL, "Image creation needs a size parameter");
    }
    if (o->backing_file && o->prealloc != CT_PREALLOC_OFF && !o->extended_l2) {
        /* Preallocated clusters would hide the backing file's data (QEMU refuses too). */
        return ct_err_set(err, -EINVAL,
                          "Backing file and preallocation can only be used at the same time if "
                          "extended_l2 is on");
    }
    return qcow2_create(path, o, size, err);
}
