/*
 * fuzz-write: the input is a bytecode of image operations, run against a fresh qcow2 image
 * and against a shadow model of its guest-visible content.
 *
 * Header (8 bytes): qcow2 creation options (compat 2/3, cluster size 512..64k, refcount
 * width 1..64, extended L2, lazy refcounts, zstd, preallocation), the virtual size, the cache
 * size of the opens, and an optional backing file (raw or qcow2, up to 1 MiB, 64 KiB stripes
 * of a pattern or zeros) under the image.
 *
 * Then operations (one opcode byte, then arguments): write (plain/FUA/all-zero buffer),
 * write_zeroes (plain/UNMAP), discard, flush, truncate (grow/shrink), reopen, read-compare,
 * check, "crash" (copy the image file as it is on disk at this instant and examine the copy),
 * "fault" (make the k-th next write/flush of the I/O layer fail with EIO or ENOSPC), and
 * extended operations: compressed cluster writes, internal snapshots (create with VM state,
 * apply, delete, diff), compaction, amend (compat 0.10 <-> 1.1, lazy refcounts) and emptying
 * (make_empty). fuzz/make-write-seeds.py documents the encoding.
 *
 * Oracles (abort() = a finding):
 *  - every read returns the model's bytes (the whole disk at the end, reads in between);
 *  - no operation fails unless an injected fault is armed;
 *  - a check in the middle of a session, and after close + reopen, finds no corruption and no
 *    leak; ct_image_info agrees with the creation options (and amends);
 *  - every snapshot, opened read-only at the end, holds the content it was taken with, and
 *    its VM state reads back; a snapshot diff covers every byte that differs;
 *  - a crash copy (and the image after an injected I/O error) opens, its check finds no
 *    corruption (leaks are allowed: invariants Q1-Q6 of src/qcow2/qcow2.h), every byte not
 *    written since the last successful flush is intact, and after a repair the check is clean.
 *
 * Model semantics: as QEMU. A discard drops whole clusters (partial clusters are kept; a tail
 * reaching the end of the image counts as whole) and dropped clusters read as zeros; on a
 * compat=0.10 image with a backing file a discard is ignored (no zero flag; dropping would
 * expose backing data). Growing the image exposes zeros, never backing-file data (QEMU
 * zero-fills the new area when the backing file is longer).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz-common.h"

#define PAGE              4096u
#define MAX_VSIZE         (4ull << 30)
#define MAX_L2_SPANS      4096 /* and at most this many L2 tables' worth (verification walks them) */
#define MAX_WRITE         (1u << 20)
#define MAX_ZERO          (8u << 20)
#define MAX_WRITTEN       (16u << 20)
#define MAX_OPS           96
#define MAX_CRASH         2
#define FULL_VERIFY_LIMIT (8u << 20)
#define VERIFY_BUDGET     (32u << 20)
#define PREALLOC_LIMIT    (8u << 20)
#define CRASH_FILE_MAX    (256u << 20)
#define BASE_STRIPE       (64u << 10)
#define EMPTY             UINT64_MAX
/* The model's byte loops run over every byte verified: keep libFuzzer's coverage and
 * comparison tracing out of them (they would dominate the run time and add no signal). */
#define FZ_NOCOV __attribute__((no_sanitize("coverage"), noinline))

struct page {
    uint64_t idx; /* EMPTY = free slot */
    uint8_t *data;
    bool dirty; /* modified since the last successful flush */
};

struct model {
    int version;
    unsigned cs, sub, rbits;
    bool ext_l2, lazy;
    int backing; /* 0 none, 1 raw, 2 qcow2 */
    uint64_t size;
    uint64_t base_size, base_vis;
    uint32_t base_mask;
    uint32_t base_seed;
    struct page *tab;
    size_t cap, n;
    uint64_t written;
    uint64_t max_size;
    /* After an interrupted truncate the header may hold either size. */
    bool has_alt;
    uint64_t alt_size;
    /* Every byte may differ in a crash copy until the next flush (snapshot apply, emptying). */
    bool all_dirty;
    /* Leaks are acceptable at the end (an operation failed in an allowed way). */
    bool allow_leaks;
    bool amended; /* compat changed: a crash copy may carry either version */
    /* Applying a snapshot that saved VM state copies the state's L2 entries (past the disk,
     * from the next L1 boundary) into the active L1, as QEMU does: growing the disk past this
     * offset would show the VM state. Grows stop below it. */
    uint64_t vm_exposed_from;
    bool snap_fault; /* a snapshot operation failed on an injected I/O error */
};

#define MAX_SNAPS 4
struct snap {
    char name[16];
    struct model st; /* the content when taken (only tab, size, base_vis matter) */
    uint32_t vm_seed;
    uint64_t vm_len;
};

static const char *const op_names[16] = {
    "write",    "write",  "write", "write-fua", "zero",  "zero-unmap", "discard",       "flush",
    "truncate", "reopen", "crash", "read",      "check", "fault",      "write-zerobuf", "extended"};
static const char *const ext_names[8] = {
    "write-compressed", "write-compressed-noise", "snapshot-create", "snapshot-apply",
    "snapshot-delete",  "snapshot-diff",          "compact",         "amend/make-empty"};

/* FUZZ_AVOID names (see fuzz-common.h): known bugs the decoding can steer around.
 *   snapshot-fault-copied  a snapshot creation interrupted by an I/O error leaves refcounts
 *                      raised under L1/L2 entries that still carry COPIED: the check of the
 *                      file as it is reports OFLAG_COPIED errors, not just leaks: tolerate
 *                      those after a failed snapshot operation
 * (Fixed, names retired: v2-backing, prealloc-metadata, v3-512-backing, grow-backing,
 * fault-leak, prealloc-backing, compressed-narrow-refcount, compressed-stale-alloc,
 * compact-fault-leak, compact-partial-end; their inputs are in tests/fuzz/regressions/.) */
static bool avoid_snapshot_fault_copied;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    fz_verbose = getenv("FUZZ_VERBOSE") != NULL;
    avoid_snapshot_fault_copied = fz_avoid("snapshot-fault-copied");
    /* Count I/O calls from the start so "fault" can name the k-th next one. */
    ct_fault_configure("count");
    return 0;
}

/* Why the data path refused (newer libraries; weak so that older ones still link). */
const char *ct_image_last_error(const struct ct_image *img) __attribute__((weak));

static const char *last_error(const struct ct_image *img)
{
    const char *why = img && ct_image_last_error ? ct_image_last_error(img) : NULL;
    return why ? why : "";
}

/* ---- the model ---- */

static FZ_NOCOV uint8_t pat(uint32_t seed, uint64_t off)
{
    uint32_t x =
        (uint32_t)off * 2654435761u ^ (uint32_t)(off >> 32) * 0x85ebca77u ^ seed * 0x01000193u;
    x ^= x >> 15;
    x *= 0x2c1b3c6du;
    x ^= x >> 12;
    return (uint8_t)x;
}

static uint64_t base_limit(const struct model *m)
{
    return m->base_vis < m->base_size ? m->base_vis : m->base_size;
}

static FZ_NOCOV void base_fill(const struct model *m, uint8_t *buf, uint64_t off, uint64_t len)
{
    uint64_t lim = base_limit(m);
    for (uint64_t i = 0; i < len; i++) {
        uint64_t o = off + i;
        if (o >= lim) {
            memset(buf + i, 0, len - i);
            return;
        }
        buf[i] = ((m->base_mask >> (o / BASE_STRIPE)) & 1) ? pat(m->base_seed, o) : 0;
    }
}

static FZ_NOCOV bool base_zero(const struct model *m, uint64_t off, uint64_t len)
{
    uint64_t lim = base_limit(m);
    for (uint64_t o = off; o < off + len && o < lim; o++) {
        if (((m->base_mask >> (o / BASE_STRIPE)) & 1) && pat(m->base_seed, o)) {
            return false;
        }
    }
    return true;
}

static FZ_NOCOV size_t slot_of(const struct model *m, uint64_t idx)
{
    return (size_t)((idx * 0x9e3779b97f4a7c15ull) >> 17) & (m->cap - 1);
}

static FZ_NOCOV struct page *page_find(const struct model *m, uint64_t idx)
{
    if (!m->cap) {
        return NULL;
    }
    for (size_t s = slot_of(m, idx);; s = (s + 1) & (m->cap - 1)) {
        if (m->tab[s].idx == idx) {
            return &m->tab[s];
        }
        if (m->tab[s].idx == EMPTY) {
            return NULL;
        }
    }
}

static void tab_insert(struct model *m, struct page pg)
{
    size_t s = slot_of(m, pg.idx);
    while (m->tab[s].idx != EMPTY) {
        s = (s + 1) & (m->cap - 1);
    }
    m->tab[s] = pg;
    m->n++;
}

static void tab_rebuild(struct model *m, size_t cap, uint64_t drop_from)
{
    struct page *old = m->tab;
    size_t ocap = m->cap;
    m->tab = malloc(cap * sizeof(*m->tab));
    if (!m->tab) {
        fz_die("out of memory");
    }
    for (size_t i = 0; i < cap; i++) {
        m->tab[i].idx = EMPTY;
    }
    m->cap = cap;
    m->n = 0;
    for (size_t i = 0; i < ocap; i++) {
        if (old[i].idx == EMPTY) {
            continue;
        }
        if (old[i].idx >= drop_from) {
            free(old[i].data);
            continue;
        }
        tab_insert(m, old[i]);
    }
    free(old);
}

static struct page *page_get(struct model *m, uint64_t idx)
{
    struct page *p = page_find(m, idx);
    if (p) {
        return p;
    }
    if ((m->n + 1) * 2 > m->cap) {
        tab_rebuild(m, m->cap ? m->cap * 2 : 256, EMPTY);
    }
    struct page pg = {.idx = idx, .data = malloc(PAGE), .dirty = false};
    if (!pg.data) {
        fz_die("out of memory");
    }
    base_fill(m, pg.data, idx * PAGE, PAGE);
    tab_insert(m, pg);
    return page_find(m, idx);
}

enum how { SET_DATA, SET_ZERO, SET_BASE };

static FZ_NOCOV void m_set(struct model *m, uint64_t off, uint64_t len, enum how how, uint32_t seed)
{
    while (len) {
        uint64_t idx = off / PAGE, in = off % PAGE, n = PAGE - in < len ? PAGE - in : len;
        struct page *p = page_find(m, idx);
        /* An absent page reads as the base; skip creating one when nothing changes. */
        if (p || (how == SET_DATA) || (how == SET_ZERO && !base_zero(m, off, n))) {
            if (!p) {
                p = page_get(m, idx);
            }
            switch (how) {
            case SET_DATA:
                for (uint64_t i = 0; i < n; i++) {
                    p->data[in + i] = pat(seed, off + i);
                }
                break;
            case SET_ZERO:
                memset(p->data + in, 0, n);
                break;
            case SET_BASE:
                base_fill(m, p->data + in, off, n);
                break;
            }
            p->dirty = true;
        }
        off += n;
        len -= n;
    }
}

static void m_dirty(struct model *m, uint64_t off, uint64_t len)
{
    for (uint64_t idx = off / PAGE; len && idx <= (off + len - 1) / PAGE; idx++) {
        struct page *p = page_find(m, idx);
        if (p) {
            p->dirty = true;
        }
    }
}

static void m_clean(struct model *m)
{
    for (size_t i = 0; i < m->cap; i++) {
        m->tab[i].dirty = false;
    }
    m->all_dirty = false;
}

/* Write exact bytes into the model. */
static FZ_NOCOV void m_write_buf(struct model *m, uint64_t off, const uint8_t *buf, uint64_t len)
{
    while (len) {
        uint64_t idx = off / PAGE, in = off % PAGE, n = PAGE - in < len ? PAGE - in : len;
        struct page *p = page_get(m, idx);
        memcpy(p->data + in, buf, n);
        p->dirty = true;
        buf += n;
        off += n;
        len -= n;
    }
}

/* dst's content (pages, size, base visibility) becomes a deep copy of src's. */
static void m_copy_content(struct model *dst, const struct model *src)
{
    for (size_t i = 0; i < dst->cap; i++) {
        if (dst->tab[i].idx != EMPTY) {
            free(dst->tab[i].data);
        }
    }
    free(dst->tab);
    dst->cap = src->cap;
    dst->n = src->n;
    dst->tab = malloc((src->cap ? src->cap : 1) * sizeof(*dst->tab));
    if (!dst->tab) {
        fz_die("out of memory");
    }
    for (size_t i = 0; i < src->cap; i++) {
        dst->tab[i] = src->tab[i];
        dst->tab[i].dirty = false;
        if (src->tab[i].idx != EMPTY) {
            dst->tab[i].data = malloc(PAGE);
            if (!dst->tab[i].data) {
                fz_die("out of memory");
            }
            memcpy(dst->tab[i].data, src->tab[i].data, PAGE);
        }
    }
    dst->size = src->size;
    dst->base_vis = src->base_vis;
}

static bool m_page_dirty(const struct model *m, uint64_t idx)
{
    const struct page *p = page_find(m, idx);
    return p && p->dirty;
}

static FZ_NOCOV void m_expect(const struct model *m, uint8_t *buf, uint64_t off, uint64_t len)
{
    while (len) {
        uint64_t idx = off / PAGE, in = off % PAGE, n = PAGE - in < len ? PAGE - in : len;
        const struct page *p = page_find(m, idx);
        if (p) {
            memcpy(buf, p->data + in, n);
        } else {
            base_fill(m, buf, off, n);
        }
        buf += n;
        off += n;
        len -= n;
    }
}

static void m_truncate(struct model *m, uint64_t s)
{
    if (s < m->size) {
        tab_rebuild(m, m->cap ? m->cap : 256, (s + PAGE - 1) / PAGE);
        if (s % PAGE) {
            struct page *p = page_find(m, s / PAGE);
            if (p) {
                memset(p->data + s % PAGE, 0, PAGE - s % PAGE);
                p->dirty = true;
            }
        }
        if (m->base_vis > s) {
            m->base_vis = s;
        }
    }
    m->size = s;
}

static void m_free(struct model *m)
{
    for (size_t i = 0; i < m->cap; i++) {
        if (m->tab[i].idx != EMPTY) {
            free(m->tab[i].data);
        }
    }
    free(m->tab);
}

/* ---- checking the engine against the model ---- */

static void describe(const struct model *m, char *buf, size_t len)
{
    snprintf(buf, len,
             "compat=%s cluster_size=%u refcount_bits=%u extended_l2=%d size=%" PRIu64
             " backing=%s base_size=%" PRIu64,
             m->version == 2 ? "0.10" : "1.1", m->cs, m->rbits, m->ext_l2, m->size,
             m->backing == 0   ? "none"
             : m->backing == 1 ? "raw"
                               : "qcow2",
             m->base_size);
}

/* Index of the first differing byte, or n. */
static FZ_NOCOV size_t first_diff(const uint8_t *a, const uint8_t *b, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t x, y;
        memcpy(&x, a + i, 8);
        memcpy(&y, b + i, 8);
        if (x != y) {
            break;
        }
    }
    for (; i < n && a[i] == b[i]; i++) {
    }
    return i;
}

static FZ_NOCOV void compare(struct ct_image *img, const struct model *m, uint64_t off,
                             uint64_t len, const char *ctx, bool skip_dirty)
{
    static uint8_t got[256 << 10], want[256 << 10];
    while (len) {
        uint64_t n = len < sizeof(got) ? len : sizeof(got);
        int r = ct_image_pread(img, got, n, off);
        if (r < 0) {
            fz_die("%s: read of %" PRIu64 " bytes at %" PRIu64 " failed: %s %s", ctx, n, off,
                   ct_strerror(r), last_error(img));
        }
        m_expect(m, want, off, n);
        uint64_t i = 0;
        while ((i += first_diff(got + i, want + i, n - i)) < n) {
            uint64_t g = off + i;
            if (skip_dirty && m_page_dirty(m, g / PAGE)) {
                i = (g / PAGE + 1) * PAGE - off; /* the rest of this page may differ */
                if (i >= n) {
                    break;
                }
                continue;
            }
            char d[256];
            describe(m, d, sizeof(d));
            const struct page *p = page_find(m, g / PAGE);
            fz_die("%s: guest byte %" PRIu64 " reads 0x%02x, expected 0x%02x (%s; page %s; %s)",
                   ctx, g, got[i], want[i],
                   p ? "written by an operation" : "never written: zero or backing data",
                   p && p->dirty ? "dirty" : "clean", d);
        }
        off += n;
        len -= n;
    }
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Compare the disk with the model. full (and a disk of at most FULL_VERIFY_LIMIT): every byte.
 * Otherwise guided by block_status: allocated extents in full (up to a budget), unallocated
 * ones at their first and last page and at every page the model holds (any page that differs
 * from zeros/backing data), small extents in full. */
static FZ_NOCOV void verify_all(struct ct_image *img, const struct model *m, uint64_t vsize,
                                const char *ctx, bool skip_dirty, bool full)
{
    if (skip_dirty && m->all_dirty) {
        return;
    }
    if (full && vsize <= FULL_VERIFY_LIMIT) {
        compare(img, m, 0, vsize, ctx, skip_dirty);
        return;
    }
    uint64_t *keys = malloc((m->n + 1) * sizeof(*keys));
    size_t nk = 0;
    if (!keys) {
        fz_die("out of memory");
    }
    for (size_t i = 0; i < m->cap; i++) {
        if (m->tab[i].idx != EMPTY) {
            keys[nk++] = m->tab[i].idx;
        }
    }
    qsort(keys, nk, sizeof(*keys), cmp_u64);
    uint64_t budget = VERIFY_BUDGET, off = 0, nsampled = 0;
    size_t ki = 0;
    while (off < vsize) {
        struct ct_extent e;
        int r = ct_image_block_status(img, off, vsize - off, &e);
        if (r < 0) {
            fz_die("%s: block_status at %" PRIu64 " failed: %s", ctx, off, ct_strerror(r));
        }
        if (e.len == 0 || e.len > vsize - off) {
            fz_die("%s: block_status at %" PRIu64 " returned length %" PRIu64, ctx, off, e.len);
        }
        uint64_t end = off + e.len;
        if (e.len <= 2 * PAGE || ((e.flags & CT_STATUS_ALLOCATED) && e.len <= budget)) {
            compare(img, m, off, e.len, ctx, skip_dirty);
            budget -= e.len < budget ? e.len : budget;
        } else {
            if (nsampled++ < 256) {
                compare(img, m, off, PAGE, ctx, skip_dirty);
                compare(img, m, end - PAGE, PAGE, ctx, skip_dirty);
            }
            while (ki < nk && keys[ki] * PAGE + PAGE <= off) {
                ki++;
            }
            for (size_t k = ki; k < nk && keys[k] * PAGE < end; k++) {
                uint64_t a = keys[k] * PAGE > off ? keys[k] * PAGE : off;
                uint64_t b = keys[k] * PAGE + PAGE < end ? keys[k] * PAGE + PAGE : end;
                compare(img, m, a, b - a, ctx, skip_dirty);
            }
        }
        off = end;
    }
    free(keys);
}

/* allow_copied: tolerate OFLAG_COPIED findings (see snapshot-fault-copied). */
static void check_clean_ex(struct ct_image *img, bool allow_leaks, bool allow_copied,
                           const char *ctx)
{
    struct ct_check_result res;
    struct fz_report rep = {0};
    struct ct_err err = {0};
    int r = ct_image_check(img, CT_FIX_NONE, &res, fz_report_cb, &rep, &err);
    uint64_t corrupt = res.corruptions;
    if (allow_copied) {
        corrupt -= corrupt < rep.copied ? corrupt : rep.copied;
    }
    if (r < 0 || corrupt || res.check_errors || (!allow_leaks && res.leaks)) {
        fz_die("%s: check returns %d (%s) with %" PRIu64 " corruptions, %" PRIu64 " leaks, %" PRIu64
               " check errors:\n%s",
               ctx, r, r < 0 ? err.msg : "ok", res.corruptions, res.leaks, res.check_errors,
               rep.text);
    }
}

static void check_clean(struct ct_image *img, bool allow_leaks, const char *ctx)
{
    check_clean_ex(img, allow_leaks, false, ctx);
}

static struct ct_image *open_img(const char *path, unsigned flags, uint64_t cache, bool must,
                                 const char *ctx)
{
    struct ct_image *img = NULL;
    struct ct_err err = {0};
    struct ct_open_opts o = {.format = "qcow2", .flags = flags, .cache_bytes = cache};
    int r = ct_image_open(&img, path, &o, &err);
    if (r < 0) {
        if (must) {
            fz_die("%s: open (flags 0x%x) failed: %s", ctx, flags, err.msg);
        }
        return NULL;
    }
    return img;
}

/* Examine the image file as it is on disk right now, as if the process had died here. */
static void crash_verify(const struct model *m, int fd, const char *why)
{
    uint8_t *buf;
    size_t len;
    if (fz_read_all(fd, &buf, &len, CRASH_FILE_MAX) < 0) {
        return;
    }
    char path[64], ctx[160];
    int cfd = fz_memfd(buf, len, path, sizeof(path));
    const char *save = getenv("FUZZ_SAVE_DIR"); /* triage: keep each examined image */
    if (save) {
        static unsigned nsaved;
        char fn[512];
        snprintf(fn, sizeof(fn), "%s/crash-image-%u.qcow2", save, nsaved++);
        FILE *f = fopen(fn, "wb");
        if (f) {
            fwrite(buf, 1, len, f);
            fclose(f);
            fprintf(stderr, "saved %s (%s)\n", fn, why);
        }
    }
    free(buf);

    snprintf(ctx, sizeof(ctx), "%s, read-only", why);
    struct ct_image *img = open_img(path, CT_OPEN_FORCE_SHARE, 0, true, ctx);
    check_clean_ex(img, true, m->snap_fault && avoid_snapshot_fault_copied, ctx);
    uint64_t vs = ct_image_size(img);
    if (vs != m->size && !(m->has_alt && vs == m->alt_size)) {
        fz_die("%s: virtual size %" PRIu64 ", expected %" PRIu64, ctx, vs, m->size);
    }
    uint64_t cmp = vs < m->size ? vs : m->size;
    verify_all(img, m, cmp, ctx, true, false);
    ct_image_close(img, NULL);

    /* A compat=1.1 image carries the dirty bit, so the read-write open repairs it; a
     * compat=0.10 image has no dirty bit and may keep its leaks. (Each check walks every
     * refcount, so they are kept to what the oracle needs: they dominate the run time.) */
    snprintf(ctx, sizeof(ctx), "%s, opened read-write (repair)", why);
    img = open_img(path, CT_OPEN_WRITE, 0, true, ctx);
    struct ct_err err = {0};
    check_clean_ex(img, m->version == 2 || m->amended || m->allow_leaks,
                   m->version == 2 && m->snap_fault && avoid_snapshot_fault_copied, ctx);
    verify_all(img, m, cmp, ctx, true, false);
    int r = ct_image_close(img, &err);
    if (r < 0) {
        fz_die("%s: close failed: %s", ctx, err.msg);
    }
    fz_close_fd(cfd);
}

/* ---- input decoding ---- */

struct rd {
    const uint8_t *p;
    size_t n;
};

static uint8_t rd8(struct rd *r)
{
    if (!r->n) {
        return 0;
    }
    r->n--;
    return *r->p++;
}

static uint16_t rd16(struct rd *r)
{
    uint16_t v = rd8(r);
    return (uint16_t)(v << 8 | rd8(r));
}

static uint32_t rd32(struct rd *r)
{
    uint32_t v = rd16(r);
    return v << 16 | rd16(r);
}

static uint64_t gen_off(const struct model *m, struct rd *r, unsigned mode)
{
    uint32_t v = rd32(r);
    uint64_t size = m->size;
    if (!size) {
        return 0;
    }
    uint64_t ncl = (size + m->cs - 1) / m->cs, off;
    switch (mode & 3) {
    case 0:
        off = ((uint64_t)v << 8 | rd8(r)) % size;
        break;
    case 1:
        off = (v % ncl) * m->cs;
        break;
    case 2: /* a few bytes around a cluster boundary */
        off = ((v >> 8) % (ncl + 1)) * m->cs + (uint64_t)(int8_t)(v & 0xff);
        break;
    default: /* subcluster-aligned */
        off = (v % ncl) * m->cs + ((v >> 24) % 32) * m->sub;
        break;
    }
    return off < size ? off : size - 1;
}

static uint64_t gen_len(const struct model *m, struct rd *r, unsigned mode, uint64_t off,
                        uint64_t max)
{
    uint16_t v = rd16(r);
    uint64_t len;
    switch (mode & 3) {
    case 0:
        len = 1 + v % 8192;
        break;
    case 1:
        len = (uint64_t)(1 + v % 32) * m->cs;
        break;
    case 2:
        len = (uint64_t)(1 + v % 64) * m->sub;
        break;
    default:
        len = 1 + ((uint64_t)v << 7);
        break;
    }
    if (len > max) {
        len = max;
    }
    return len < m->size - off ? len : m->size - off;
}

static uint64_t gen_size(const struct model *m, struct rd *r)
{
    uint8_t mode = rd8(r);
    uint32_t v = rd32(r);
    uint64_t s;
    switch (mode % 5) {
    case 0:
        s = m->size + v % (4u * m->cs);
        break;
    case 1:
        s = m->size - (v % (4u * m->cs) < m->size ? v % (4u * m->cs) : m->size);
        break;
    case 2:
        s = (uint64_t)v * 512;
        break;
    case 3:
        s = (uint64_t)(v % 65536) * m->cs;
        break;
    default:
        s = v % (8u << 20);
        break;
    }
    return s < m->max_size ? s : m->max_size;
}

/* ---- snapshots ---- */

/* Could taking one more snapshot overflow a refcount (every snapshot and the active state
 * reference the shared clusters)? Then a refusal is legitimate. */
static bool refcount_tight(const struct model *m, unsigned nsnaps)
{
    return m->rbits < 64 && nsnaps + 2 > (1ull << m->rbits) - 1;
}

struct extents {
    uint64_t *off, *len;
    size_t n, cap;
};

static int extent_cb(void *opaque, uint64_t off, uint64_t len)
{
    struct extents *x = opaque;
    if (x->n == x->cap) {
        x->cap = x->cap ? x->cap * 2 : 256;
        x->off = realloc(x->off, x->cap * sizeof(*x->off));
        x->len = realloc(x->len, x->cap * sizeof(*x->len));
        if (!x->off || !x->len) {
            fz_die("out of memory");
        }
    }
    x->off[x->n] = off;
    x->len[x->n] = len;
    x->n++;
    return 0;
}

static bool in_extents(const struct extents *x, uint64_t pos)
{
    size_t lo = 0, hi = x->n;
    while (lo < hi) { /* first extent ending after pos */
        size_t mid = (lo + hi) / 2;
        if (x->off[mid] + x->len[mid] <= pos) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo < x->n && x->off[lo] <= pos;
}

static void diff_check_page(const struct model *a, const struct model *b, uint64_t idx,
                            uint64_t limit, const struct extents *x, const char *ctx)
{
    static uint8_t pa[PAGE], pb[PAGE];
    uint64_t off = idx * PAGE;
    if (off >= limit) {
        return;
    }
    uint64_t n = limit - off < PAGE ? limit - off : PAGE;
    m_expect(a, pa, off, n);
    m_expect(b, pb, off, n);
    for (uint64_t i = first_diff(pa, pb, n); i < n;
         i += 1 + first_diff(pa + i + 1, pb + i + 1, n - i - 1)) {
        if (!in_extents(x, off + i)) {
            fz_die("%s: byte %" PRIu64 " differs (0x%02x / 0x%02x) but no reported extent "
                   "covers it (%zu extents)",
                   ctx, off + i, pa[i], pb[i], x->n);
        }
    }
}

/* Every byte that differs between a and b (below both sizes) lies in a reported extent. */
static void diff_check(const struct model *a, const struct model *b, const struct extents *x,
                       const char *ctx)
{
    for (size_t i = 0; i < x->n; i++) {
        if (x->len[i] == 0 || (i && x->off[i] < x->off[i - 1] + x->len[i - 1])) {
            fz_die("%s: extent %zu (%" PRIu64 "+%" PRIu64 ") is empty, overlaps or is out of "
                   "order",
                   ctx, i, x->off[i], x->len[i]);
        }
    }
    uint64_t limit = a->size < b->size ? a->size : b->size;
    for (int k = 0; k < 2; k++) {
        const struct model *m = k ? b : a;
        for (size_t i = 0; i < m->cap; i++) {
            if (m->tab[i].idx != EMPTY) {
                diff_check_page(a, b, m->tab[i].idx, limit, x, ctx);
            }
        }
    }
    /* Where only one of them still sees the backing file. */
    uint64_t lo = a->base_vis < b->base_vis ? a->base_vis : b->base_vis;
    uint64_t hi = a->base_vis < b->base_vis ? b->base_vis : a->base_vis;
    hi = hi < a->base_size ? hi : a->base_size;
    for (uint64_t idx = lo / PAGE; idx * PAGE < hi; idx++) {
        diff_check_page(a, b, idx, limit, x, ctx);
    }
}

/* ---- the target ---- */

static void make_base(struct model *m, int kind, char *path, size_t path_len, int *fd,
                      unsigned base_cbits)
{
    uint8_t *buf = malloc(m->base_size ? m->base_size : 1);
    if (!buf) {
        fz_die("out of memory");
    }
    /* The backing file holds the whole pattern, whatever the overlay's size. */
    uint64_t vis = m->base_vis;
    m->base_vis = UINT64_MAX;
    base_fill(m, buf, 0, m->base_size);
    m->base_vis = vis;
    if (kind == 1) {
        *fd = fz_memfd(buf, m->base_size, path, path_len);
        free(buf);
        return;
    }
    *fd = fz_memfd(NULL, 0, path, path_len);
    struct ct_err err = {0};
    struct ct_create_opts co = {.format = "qcow2",
                                .size = m->base_size,
                                .size_given = true,
                                .cluster_size = 1u << base_cbits};
    if (ct_image_create(path, &co, &err) < 0) {
        fz_die("creating the qcow2 backing file failed: %s", err.msg);
    }
    struct ct_image *b = open_img(path, CT_OPEN_WRITE, 0, true, "backing file");
    for (uint64_t s = 0; s * BASE_STRIPE < m->base_size; s++) {
        uint64_t off = s * BASE_STRIPE;
        uint64_t n = m->base_size - off < BASE_STRIPE ? m->base_size - off : BASE_STRIPE;
        int r = 0;
        if ((m->base_mask >> s) & 1) {
            r = ct_image_pwrite(b, buf + off, n, off, 0);
        } else if (s & 1) {
            r = ct_image_pwrite_zeroes(b, n, off, 0);
        }
        if (r < 0) {
            fz_die("writing the qcow2 backing file failed: %s", ct_strerror(r));
        }
    }
    if (ct_image_close(b, &err) < 0) {
        fz_die("closing the qcow2 backing file failed: %s", err.msg);
    }
    free(buf);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 8) {
        return 0;
    }
    struct rd in = {data, size};
    uint8_t h[8];
    for (int i = 0; i < 8; i++) {
        h[i] = rd8(&in);
    }
    struct model m = {0};
    m.version = (h[0] & 1) ? 2 : 3;
    m.ext_l2 = (h[0] & 2) && m.version == 3;
    m.lazy = (h[0] & 4) && m.version == 3;
    bool zstd = (h[0] & 8) && m.version == 3;
    m.backing = (h[0] >> 4 & 3) < 2 ? 0 : (h[0] >> 4 & 3) - 1;
    bool want_prealloc = h[0] & 0x40;
    uint64_t cache = (h[0] & 0x80) ? 1 : 0; /* 1 byte = the minimum: 16 slots per cache */
    unsigned cbits = 9 + (h[1] & 7);
    if (m.ext_l2 && cbits < 14) {
        cbits = 14 + (h[1] & 7) % 3;
    }
    enum ct_prealloc prealloc = (enum ct_prealloc)(1 + (h[1] >> 3 & 3) % 3);
    bool no_open_backing = h[1] & 0x40;
    unsigned open_flags = CT_OPEN_WRITE | ((h[1] & 0x80) ? CT_OPEN_WRITETHROUGH : 0);
    m.cs = 1u << cbits;
    m.sub = m.ext_l2 ? m.cs / 32 : m.cs;
    m.rbits = m.version == 2 ? 16 : 1u << (h[2] % 7);
    /* A check walks four refcount blocks' worth of entries past the end of the file: with
     * 64 KiB clusters and 1-bit refcounts that is 2M entries per check, which would make
     * such inputs hundreds of times slower than the rest. Keep blocks at <= 32k entries. */
    while ((uint64_t)m.cs * 8 / m.rbits > 32768) {
        m.rbits *= 2;
    }
    unsigned base_cbits = 9 + (h[2] >> 3 & 7);
    switch (h[3] >> 6) {
    case 0:
        m.size = (uint64_t)(h[3] & 63) << 16 | (uint64_t)h[4] << 8 | h[5];
        break;
    case 1:
        m.size = ((uint64_t)(h[3] & 63) << 8 | h[4]) * m.cs;
        break;
    case 2:
        m.size = ((uint64_t)(h[3] & 63) << 8 | h[4]) << 18 | (uint64_t)h[5] << 9;
        break;
    default:
        m.size = (uint64_t)h[5] << 9;
        break;
    }
    uint64_t span = (uint64_t)m.cs * (m.cs / (m.ext_l2 ? 16 : 8));
    m.max_size = span * MAX_L2_SPANS < MAX_VSIZE ? span * MAX_L2_SPANS : MAX_VSIZE;
    if (m.size > m.max_size) {
        m.size = m.max_size;
    }
    m.base_vis = m.size;
    m.vm_exposed_from = UINT64_MAX;
    if (m.backing) {
        m.base_size = ((uint64_t)(h[6] & 15) + 1) * BASE_STRIPE - (uint64_t)(h[6] >> 4) * 1000;
        m.base_mask = h[7] | (uint32_t)(h[7] ^ 0x5a) << 8;
        m.base_seed = 0xba5e0000u | h[6] << 8 | h[7];
    }
    if (m.size > PREALLOC_LIMIT) {
        want_prealloc = false;
    }

    char bpath[64] = "", path[64];
    int bfd = -1;
    if (m.backing) {
        make_base(&m, m.backing, bpath, sizeof(bpath), &bfd, base_cbits);
    }
    int fd = fz_memfd(NULL, 0, path, sizeof(path));
    struct ct_create_opts co = {
        .format = "qcow2",
        .size = m.size,
        .size_given = true,
        .backing_file = m.backing ? bpath : NULL,
        .backing_format = m.backing == 1   ? "raw"
                          : m.backing == 2 ? "qcow2"
                                           : NULL,
        .no_open_backing = no_open_backing,
        .cluster_size = m.cs,
        .compat = m.version,
        .refcount_bits = m.rbits,
        .lazy_refcounts = m.lazy,
        .extended_l2 = m.ext_l2,
        .compression_type = zstd ? 1 : 0,
        /* Preallocation with a backing file needs extended L2 (it would hide the backing
         * data otherwise; create refuses it, as QEMU does). */
        .prealloc = want_prealloc && (!m.backing || m.ext_l2) ? prealloc : CT_PREALLOC_OFF,
    };
    char desc[256];
    describe(&m, desc, sizeof(desc));
    fz_log("create: %s lazy=%d zstd=%d prealloc=%d cache=%" PRIu64 " flags=0x%x", desc, m.lazy,
           zstd, (int)co.prealloc, cache, open_flags);
    struct ct_err err = {0};
    int r = ct_image_create(path, &co, &err);
    if (r < 0) {
        fz_die("ct_image_create (%s) failed: %s", desc, err.msg);
    }
    struct ct_image *img = open_img(path, open_flags, cache, true, "open after create");
    verify_all(img, &m, m.size, "right after create", false, false);

    bool armed = false, faulted = false;
    unsigned crashes = 0;
    struct snap snaps[MAX_SNAPS];
    unsigned nsnaps = 0, snapseq = 0;
    uint32_t seq = 0;
    static uint8_t wbuf[MAX_WRITE];
    for (unsigned nops = 0; in.n && nops < MAX_OPS; nops++) {
        uint8_t op = rd8(&in);
        unsigned kind = op & 15, om = op >> 4 & 3, lm = op >> 6;
        bool snap_op = false;
        uint64_t off = 0, len = 0;
        char ctx[160];
        r = 0;
        const char *name = op_names[kind];
        switch (kind) {
        case 0:
        case 1:
        case 2:
        case 3:
        case 14: {
            off = gen_off(&m, &in, om);
            len = gen_len(&m, &in, lm, off, MAX_WRITE);
            if (!len || m.written + len > MAX_WRITTEN) {
                continue;
            }
            m.written += len;
            uint32_t seed = ++seq;
            if (kind == 14) {
                memset(wbuf, 0, len);
            } else {
                for (uint64_t i = 0; i < len; i++) {
                    wbuf[i] = pat(seed, off + i);
                }
            }
            m_dirty(&m, off, len);
            r = ct_image_pwrite(img, wbuf, len, off, kind == 3 ? CT_WRITE_FUA : 0);
            m_set(&m, off, len, kind == 14 ? SET_ZERO : SET_DATA, seed);
            break;
        }
        case 4:
        case 5:
            off = gen_off(&m, &in, om);
            len = gen_len(&m, &in, lm, off, MAX_ZERO);
            if (!len) {
                continue;
            }
            m_dirty(&m, off, len);
            r = ct_image_pwrite_zeroes(img, len, off, kind == 5 ? CT_WRITE_UNMAP : 0);
            m_set(&m, off, len, SET_ZERO, 0);
            break;
        case 6: {
            off = gen_off(&m, &in, om);
            len = gen_len(&m, &in, lm, off, MAX_ZERO);
            if (!len) {
                continue;
            }
            m_dirty(&m, off, len);
            r = ct_image_discard(img, len, off);
            uint64_t end = off + len;
            uint64_t a = (off + m.cs - 1) / m.cs * m.cs;
            uint64_t b = end == m.size ? m.size : end / m.cs * m.cs;
            /* compat=0.10 over a backing file: no zero flag, and dropping the cluster would
             * expose the backing data, so the discard is ignored (as QEMU does). */
            if (a < b && !(m.version == 2 && m.backing)) {
                m_set(&m, a, b - a, SET_ZERO, 0);
            }
            break;
        }
        case 7:
            r = ct_image_flush(img);
            if (r == 0) {
                m_clean(&m);
            }
            break;
        case 8: {
            uint64_t s = gen_size(&m, &in);
            off = s;
            if (s > m.vm_exposed_from) {
                continue;
            }
            if (s < m.size) {
                m_dirty(&m, s / PAGE * PAGE, PAGE);
            }
            uint64_t old = m.size;
            r = ct_image_truncate(img, s, true, &err);
            if (r < 0 && !armed && nsnaps && (s < old || m.version == 2)) {
                /* QEMU refuses these too: shrinking an image with snapshots, and resizing a
                 * compat=0.10 one with snapshots (its snapshot table has no disk size). */
                fz_log("op %u: resize refused with snapshots: %s", nops, err.msg);
                continue;
            }
            if (r < 0) {
                m.has_alt = true;
                m.alt_size = old;
            }
            m_truncate(&m, s);
            break;
        }
        case 9: {
            unsigned fl = CT_OPEN_WRITE | ((om & 1) ? CT_OPEN_WRITETHROUGH : 0);
            r = ct_image_close(img, &err);
            img = NULL;
            if (r == 0) {
                m_clean(&m);
                img = open_img(path, fl, (om & 2) ? 1 : 0, !armed, "reopen");
                if (!img) {
                    r = -EIO;
                }
            }
            break;
        }
        case 10:
            if (armed || crashes >= MAX_CRASH) {
                continue;
            }
            crashes++;
            snprintf(ctx, sizeof(ctx), "crash copy after op %u", nops);
            fz_log("op %u: crash copy", nops);
            crash_verify(&m, fd, ctx);
            continue;
        case 11:
            off = gen_off(&m, &in, om);
            len = gen_len(&m, &in, lm, off, 256u << 10);
            if (armed) {
                continue; /* a read may write back an evicted table: the fault could hit it */
            }
            snprintf(ctx, sizeof(ctx), "read of %" PRIu64 "+%" PRIu64 " after op %u", off, len,
                     nops);
            compare(img, &m, off, len, ctx, false);
            fz_log("op %u: read %" PRIu64 "+%" PRIu64 " ok", nops, off, len);
            continue;
        case 12: {
            struct ct_check_result res;
            struct fz_report rep = {0};
            r = ct_image_check(img, CT_FIX_NONE, &res, fz_report_cb, &rep, &err);
            if (r == 0 && (res.corruptions || res.leaks || res.check_errors)) {
                fz_die("check in the middle of a session (after op %u) finds %" PRIu64
                       " corruptions, %" PRIu64 " leaks, %" PRIu64 " check errors:\n%s",
                       nops, res.corruptions, res.leaks, res.check_errors, rep.text);
            }
            break;
        }
        case 13: {
            uint8_t a = rd8(&in), b = rd8(&in);
            if (armed) {
                continue;
            }
            uint64_t w, f;
            ct_fault_counts(&w, &f);
            unsigned k = 1 + a % 48;
            char spec[64];
            const char *opn = b % 3 == 0 ? "write" : b % 3 == 1 ? "flush" : "any";
            uint64_t base = b % 3 == 0 ? w : b % 3 == 1 ? f : w + f;
            snprintf(spec, sizeof(spec), "%s:%" PRIu64 ":%s", opn, base + k,
                     (b & 4) ? "enospc" : "eio");
            if (ct_fault_configure(spec) != 0) {
                fz_die("ct_fault_configure(%s) failed", spec);
            }
            armed = true;
            fz_log("op %u: fault armed: %s (%u calls from now)", nops, spec, k);
            continue;
        }
        case 15: {
            uint8_t sub = rd8(&in);
            uint32_t v = rd32(&in);
            unsigned what = sub & 7;
            name = ext_names[what];
            snap_op = what >= 2 && what <= 4;
            if (what <= 1) {
                uint64_t ncl = (m.size + m.cs - 1) / m.cs;
                if (!ncl) {
                    continue;
                }
                off = (v % ncl) * m.cs;
                len = m.size - off < m.cs ? m.size - off : m.cs;
                if (m.written + len > MAX_WRITTEN) {
                    continue;
                }
                m.written += len;
                uint32_t seed = ++seq;
                for (uint64_t i = 0; i < len; i++) {
                    wbuf[i] = what == 0 ? pat(seed, (off + i) >> 6) : pat(seed, off + i);
                }
                m_dirty(&m, off, len);
                r = ct_image_pwrite_compressed(img, wbuf, len, off);

                m_write_buf(&m, off, wbuf, len);
            } else if (what == 2) {
                if (nsnaps == MAX_SNAPS) {
                    continue;
                }
                struct snap *sn = &snaps[nsnaps];
                memset(sn, 0, sizeof(*sn));
                snprintf(sn->name, sizeof(sn->name), "s%u", ++snapseq);
                sn->vm_seed = ++seq;
                sn->vm_len = (v & 3) ? (v >> 2) % 70000 : 0;
                uint8_t *vm = malloc(sn->vm_len + 1);
                if (!vm) {
                    fz_die("out of memory");
                }
                for (uint64_t i = 0; i < sn->vm_len; i++) {
                    vm[i] = pat(sn->vm_seed, i);
                }
                struct ct_snapshot_create_opts so = {.date_sec = 1000 + snapseq,
                                                     .vm_clock_nsec = v,
                                                     .vmstate = sn->vm_len ? vm : NULL,
                                                     .vmstate_len = sn->vm_len};
                r = ct_snapshot_create(img, sn->name, &so, &err);
                free(vm);
                off = nsnaps;
                len = sn->vm_len;
                if (r < 0 && !armed && refcount_tight(&m, nsnaps)) {
                    fz_log("op %u: snapshot refused, refcounts too narrow: %s", nops, err.msg);
                    m.allow_leaks = true;
                    continue;
                }
                if (r == 0) {
                    sn->st = m;
                    sn->st.tab = NULL;
                    sn->st.cap = sn->st.n = 0;
                    m_copy_content(&sn->st, &m);
                    nsnaps++;
                }
            } else if (what == 3 || what == 4) {
                if (!nsnaps) {
                    continue;
                }
                unsigned i = v % nsnaps;
                off = i;
                if (what == 3) {
                    uint64_t old = m.size;
                    r = ct_snapshot_apply(img, snaps[i].name, &err);
                    if ((r == 0 || armed) && snaps[i].vm_len) {
                        uint64_t vo = (snaps[i].st.size + span - 1) / span * span;
                        m.vm_exposed_from = vo < m.vm_exposed_from ? vo : m.vm_exposed_from;
                    }
                    if (r == 0 || armed) {
                        m_copy_content(&m, &snaps[i].st);
                        m.all_dirty = true;
                        m.has_alt = true;
                        m.alt_size = old;
                    }
                } else {
                    r = ct_snapshot_delete(img, snaps[i].name, &err);
                    if (r == 0) {
                        m_free(&snaps[i].st);
                        snaps[i] = snaps[--nsnaps];
                    }
                }
            } else if (what == 5) {
                if (!nsnaps || armed) {
                    continue;
                }
                unsigned i = v % nsnaps, j = (v >> 8) % (nsnaps + 1);
                struct extents x = {0};
                r = ct_snapshot_diff(img, snaps[i].name, j < nsnaps ? snaps[j].name : NULL,
                                     extent_cb, &x, &err);
                if (r == 0) {
                    snprintf(ctx, sizeof(ctx), "snapshot diff %s..%s after op %u", snaps[i].name,
                             j < nsnaps ? snaps[j].name : "active", nops);
                    diff_check(&snaps[i].st, j < nsnaps ? &snaps[j].st : &m, &x, ctx);
                }
                len = x.n;
                free(x.off);
                free(x.len);
            } else if (what == 6) {
                struct ct_compact_result cr = {0};
                r = ct_image_compact(img, &cr, &err);
                len = cr.clusters_moved; /* (file_size_before predates the metadata flush) */
            } else {
                unsigned sel = sub >> 3 & 3;
                if (sel == 3) {
                    r = ct_image_make_empty(img, &err);
                    if (r == 0 || armed) {
                        tab_rebuild(&m, m.cap ? m.cap : 256, 0);
                        m.base_vis = m.size; /* a later grow zero-fills past the size */
                        m.all_dirty = true;
                    }
                } else {
                    int compat = sel == 0 ? 2 : sel == 1 ? 3 : 0;
                    int lazy = sel == 2 ? !m.lazy : -1;
                    off = (uint64_t)compat;
                    r = ct_image_amend(img, compat, lazy, &err);
                    if (r < 0 && !armed) {
                        /* Not every image can be downgraded (extended L2, zstd, refcount
                         * width, ...): a refusal is fine, as long as nothing changed. */
                        fz_log("op %u: amend(compat %d, lazy %d) refused: %s", nops, compat, lazy,
                               err.msg);
                        continue;
                    }
                    if (compat && compat != m.version) {
                        m.amended = true;
                        m.version = compat;
                    }
                    if (lazy >= 0) {
                        m.lazy = lazy;
                    }
                }
            }
            break;
        }
        default:
            continue;
        }
        fz_log("op %u: %s off=%" PRIu64 " len=%" PRIu64 " -> %d%s", nops, name, off, len, r,
               armed ? " (fault armed)" : "");
        if (r < 0) {
            if (!armed) {
                char d[256];
                describe(&m, d, sizeof(d));
                fz_die("op %u (%s, off %" PRIu64 ", len %" PRIu64 ") failed with no fault "
                       "injected: %s %s %s (%s)",
                       nops, name, off, len, ct_strerror(r), err.code == r ? err.msg : "",
                       last_error(img), d);
            }
            faulted = true;
            m.snap_fault = snap_op;
            break;
        }
    }

    if (!faulted && !armed) {
        verify_all(img, &m, m.size, "end of the operations", false, false);
    }
    r = ct_image_close(img, &err);
    img = NULL;
    if (r < 0) {
        if (!armed) {
            fz_die("close failed with no fault injected: %s", err.msg);
        }
        faulted = true;
    }
    ct_fault_configure("count");
    if (faulted) {
        crash_verify(&m, fd, "image after an injected I/O error");
    } else {
        img = open_img(path, 0, 0, true, "reopen after close");
        check_clean(img, m.allow_leaks, "after close and reopen");
        if (ct_image_size(img) != m.size) {
            fz_die("after reopen: virtual size %" PRIu64 ", expected %" PRIu64, ct_image_size(img),
                   m.size);
        }
        verify_all(img, &m, m.size, "after close and reopen", false, true);
        struct ct_image_info info;
        if (ct_image_info(img, &info) < 0) {
            fz_die("ct_image_info failed");
        }
        if (info.version != m.version || info.cluster_size != m.cs ||
            info.refcount_bits != m.rbits || info.extended_l2 != m.ext_l2 || info.dirty ||
            info.corrupt || info.virtual_size != m.size ||
            info.compression_type != (zstd ? 1 : 0) || info.lazy_refcounts != m.lazy) {
            fz_die("ct_image_info disagrees with the creation options: version %d cluster %u "
                   "refcount_bits %u extended_l2 %d dirty %d corrupt %d size %" PRIu64
                   " compression %d lazy %d",
                   info.version, info.cluster_size, info.refcount_bits, info.extended_l2,
                   info.dirty, info.corrupt, info.virtual_size, info.compression_type,
                   info.lazy_refcounts);
        }
        if (ct_snapshot_count(img) != (int)nsnaps) {
            fz_die("%d snapshots, expected %u", ct_snapshot_count(img), nsnaps);
        }
        for (unsigned i = 0; i < nsnaps; i++) {
            char ctx[96];
            snprintf(ctx, sizeof(ctx), "snapshot %s after close and reopen", snaps[i].name);
            uint8_t *vm = malloc(snaps[i].vm_len + 1);
            if (!vm) {
                fz_die("out of memory");
            }
            r = ct_snapshot_read_vmstate(img, snaps[i].name, vm, snaps[i].vm_len, 0, &err);
            if (r < 0) {
                fz_die("%s: reading its VM state (%" PRIu64 " bytes) failed: %s", ctx,
                       snaps[i].vm_len, err.msg);
            }
            for (uint64_t k = 0; k < snaps[i].vm_len; k++) {
                if (vm[k] != pat(snaps[i].vm_seed, k)) {
                    fz_die("%s: VM state byte %" PRIu64 " is 0x%02x, expected 0x%02x", ctx, k,
                           vm[k], pat(snaps[i].vm_seed, k));
                }
            }
            free(vm);
            struct ct_image *si = NULL;
            struct ct_open_opts so = {.format = "qcow2", .snapshot = snaps[i].name};
            if (ct_image_open(&si, path, &so, &err) < 0) {
                fz_die("%s: opening it read-only failed: %s", ctx, err.msg);
            }
            if (ct_image_size(si) != snaps[i].st.size) {
                fz_die("%s: virtual size %" PRIu64 ", expected %" PRIu64, ctx, ct_image_size(si),
                       snaps[i].st.size);
            }
            verify_all(si, &snaps[i].st, snaps[i].st.size, ctx, false, true);
            ct_image_close(si, NULL);
        }
        ct_image_close(img, NULL);
    }
    for (unsigned i = 0; i < nsnaps; i++) {
        m_free(&snaps[i].st);
    }
    fz_close_fd(fd);
    fz_close_fd(bfd);
    m_free(&m);
    return 0;
}
