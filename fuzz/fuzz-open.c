/*
 * fuzz-open: the input is a qcow2 image (the whole input, as file bytes).
 *
 * Phase 1, read-only (CT_OPEN_NO_BACKING, format qcow2): info, check without repair,
 * block_status and map over the whole virtual size (bounded number of calls), and reads of a
 * sample of ranges (bounded total bytes). Oracles: no sanitizer report; a failed open fills
 * err with its code and a message; block_status/map make progress inside the image; what
 * block_status calls ZERO or unallocated (no backing is opened) reads as zeros; reading the
 * same range twice gives the same bytes.
 *
 * Phase 2, read-write on a private copy: check with CT_FIX_ALL, a few writes, zero writes, a
 * discard and a grow, each write read back; close, reopen read-only, check again. Oracles,
 * once a repair reported success (no corruption left, no check error):
 *   - an immediate re-check finds no corruption (and no leak when none was left);
 *   - every successful write reads back;
 *   - after close and reopen the check finds no corruption; when every operation and the
 *     close succeeded, no leak either, and the written data is still there.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz-common.h"

#define READ_BUDGET      (2u << 20)
#define MAX_STATUS_CALLS 4096
#define MAX_SAMPLES      24
#define MAX_CHUNK        (64u << 10)

/* FUZZ_AVOID names (see fuzz-common.h): none open. (Retired, fixed: check-past-eof,
 * check-compressed-past-eof, partial-last-cluster; their inputs are in tests/fuzz/regressions/.)
 */

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    fz_verbose = getenv("FUZZ_VERBOSE") != NULL;
    return 0;
}

/* Why the data path refused the image: ct_image_last_error() where the library has it (weak:
 * older libraries lack it), else what qcow2_corrupt printed on stderr. The stdio stream is
 * captured; sanitizer and libFuzzer reports write to fd 2 directly and still show. */
const char *ct_image_last_error(const struct ct_image *img) __attribute__((weak));

static char *cap_buf;
static size_t cap_len;

static void capture_stderr(void)
{
    fflush(stderr);
    fz_stderr = stderr;
    FILE *mem = open_memstream(&cap_buf, &cap_len);
    if (!mem) {
        fz_die("open_memstream failed");
    }
    stderr = mem;
}

/* Restore stderr; returns what was written (static buffer, truncated). */
static const char *release_stderr(void)
{
    static char text[4096];
    fclose(stderr);
    stderr = fz_stderr;
    snprintf(text, sizeof(text), "%.*s", (int)(cap_len < sizeof(text) ? cap_len : sizeof(text) - 1),
             cap_buf ? cap_buf : "");
    free(cap_buf);
    cap_buf = NULL;
    if (fz_verbose && text[0]) {
        fputs(text, stderr);
    }
    return text;
}

static bool all_zero(const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (p[i]) {
            return false;
        }
    }
    return true;
}

static void check_open_error(int r, const struct ct_err *err, const char *what)
{
    if (r >= 0) {
        return;
    }
    if (err->code != r || err->msg[0] == '\0' ||
        strnlen(err->msg, sizeof(err->msg)) == sizeof(err->msg)) {
        fz_die("%s failed with %d (%s) but err holds code %d and message '%.200s' (API contract: "
               "err carries the returned code and one message)",
               what, r, ct_strerror(r), err->code, err->msg);
    }
}

struct sample {
    uint64_t off, len;
    unsigned flags; /* CT_STATUS_* from block_status, or ~0u when unknown */
};

static void read_phase(struct ct_image *img)
{
    capture_stderr();
    uint64_t size = ct_image_size(img);
    struct ct_image_info info;
    int r = ct_image_info(img, &info);
    if (r == 0 && info.virtual_size != size) {
        fz_die("info.virtual_size %llu != ct_image_size %llu",
               (unsigned long long)info.virtual_size, (unsigned long long)size);
    }
    if (r == 0 && info.format && strcmp(info.format, "qcow2") != 0) {
        fz_die("info.format is '%s', opened as qcow2", info.format);
    }
    unsigned cs = r == 0 && info.cluster_size ? info.cluster_size : 65536;

    struct ct_check_result res;
    struct fz_report rep = {0};
    struct ct_err err = {0};
    r = ct_image_check(img, CT_FIX_NONE, &res, fz_report_cb, &rep, &err);
    check_open_error(r, &err, "ct_image_check");
    bool clean = r == 0 && res.corruptions == 0 && res.check_errors == 0;
    fz_log("check: r=%d corruptions=%llu leaks=%llu errors=%llu", r,
           (unsigned long long)res.corruptions, (unsigned long long)res.leaks,
           (unsigned long long)res.check_errors);

    struct sample samples[MAX_SAMPLES];
    unsigned ns = 0;
    samples[ns++] = (struct sample){0, size < MAX_CHUNK ? size : MAX_CHUNK, ~0u};
    if (size > MAX_CHUNK) {
        samples[ns++] = (struct sample){size - MAX_CHUNK, MAX_CHUNK, ~0u};
    }
    /* Walk the whole size; unallocated L2 ranges come back one table at a time. */
    uint64_t off = 0;
    for (unsigned n = 0; off < size && n < MAX_STATUS_CALLS; n++) {
        struct ct_extent e;
        r = ct_image_block_status(img, off, size - off, &e);
        if (r < 0) {
            break;
        }
        if (e.len == 0 || e.len > size - off) {
            fz_die("block_status(off=%llu, len=%llu) returned 0 with extent length %llu",
                   (unsigned long long)off, (unsigned long long)(size - off),
                   (unsigned long long)e.len);
        }
        if ((e.flags & (CT_STATUS_DATA | CT_STATUS_ZERO)) && !(e.flags & CT_STATUS_ALLOCATED)) {
            fz_die("block_status flags 0x%x: DATA/ZERO without ALLOCATED", e.flags);
        }
        if ((e.flags & CT_STATUS_COMPRESSED) && !(e.flags & CT_STATUS_DATA)) {
            fz_die("block_status flags 0x%x: COMPRESSED without DATA", e.flags);
        }
        if (ns < MAX_SAMPLES && (e.flags || ns < MAX_SAMPLES / 2)) {
            samples[ns++] = (struct sample){off, e.len < MAX_CHUNK ? e.len : MAX_CHUNK, e.flags};
        }
        off += e.len;
    }
    /* Spot queries spread over the size (far regions of huge sparse images). */
    for (unsigned k = 1; k < 16 && size; k++) {
        struct ct_extent e;
        uint64_t o = size / 16 * k;
        if (ct_image_block_status(img, o, size - o, &e) == 0 && (e.len == 0 || e.len > size - o)) {
            fz_die("block_status(off=%llu) returned extent length %llu", (unsigned long long)o,
                   (unsigned long long)e.len);
        }
    }
    off = 0;
    for (unsigned n = 0; off < size && n < MAX_STATUS_CALLS / 4; n++) {
        struct ct_map_extent me;
        r = ct_image_map(img, off, size - off, &me);
        if (r < 0) {
            break;
        }
        if (me.off != off || me.len == 0 || me.len > size - off || me.depth != 0 ||
            me.layer != img) {
            fz_die("map(off=%llu): extent off=%llu len=%llu depth=%u layer=%p (image %p, no "
                   "backing opened)",
                   (unsigned long long)off, (unsigned long long)me.off, (unsigned long long)me.len,
                   me.depth, (const void *)me.layer, (void *)img);
        }
        off += me.len;
    }

    uint8_t *a = malloc(MAX_CHUNK), *b = malloc(MAX_CHUNK);
    if (!a || !b) {
        fz_die("out of memory");
    }
    uint64_t budget = READ_BUDGET;
    for (unsigned i = 0; i < ns && budget; i++) {
        uint64_t len = samples[i].len < budget ? samples[i].len : budget;
        if (!len) {
            continue;
        }
        budget -= len;
        r = ct_image_pread(img, a, len, samples[i].off);
        if (r < 0) {
            continue;
        }
        unsigned f = samples[i].flags;
        if (f != ~0u && (!(f & CT_STATUS_ALLOCATED) || (f & CT_STATUS_ZERO)) &&
            !(f & CT_STATUS_DATA) && !all_zero(a, len)) {
            fz_die("block_status says %s at %llu (+%llu) but the read returns non-zero bytes",
                   (f & CT_STATUS_ZERO) ? "ZERO" : "unallocated (no backing)",
                   (unsigned long long)samples[i].off, (unsigned long long)len);
        }
        if (ct_image_pread(img, b, len, samples[i].off) == 0 && memcmp(a, b, len) != 0) {
            fz_die("two reads of %llu (+%llu) returned different bytes",
                   (unsigned long long)samples[i].off, (unsigned long long)len);
        }
    }
    /* Unaligned small reads across cluster boundaries. */
    for (unsigned k = 1; k < 4 && size > (uint64_t)cs * k; k++) {
        uint64_t o = (uint64_t)cs * k - 7;
        uint64_t len = size - o < 4103 ? size - o : 4103;
        (void)ct_image_pread(img, a, len, o);
    }
    free(a);
    free(b);
    const char *msgs = release_stderr();
    const char *why = ct_image_last_error ? ct_image_last_error(img) : NULL;
    if (why) {
        msgs = why;
    }
    /* A clean check, then the data path calls the image corrupt because something lies past
     * the end of the file: the check missed it (qemu-img check reports such references). */
    if (clean && (strstr(msgs, "past the end of the file") || strstr(msgs, "out of range"))) {
        fz_die("the check finds no corruption (%llu leaks) but the data path refuses the "
               "image: %s",
               (unsigned long long)res.leaks, msgs);
    }
}

static void pattern(uint8_t *buf, size_t len, uint64_t off, unsigned seed)
{
    for (size_t i = 0; i < len; i++) {
        uint32_t x = (uint32_t)(off + i) * 2654435761u ^ seed * 0x01000193u;
        buf[i] = (uint8_t)((x >> 13) ^ (x >> 24));
    }
}

struct written {
    uint64_t off, len;
    unsigned seed;
    bool zero;
};

static bool verify_written(struct ct_image *img, const struct written *w, unsigned nw,
                           const char *when)
{
    for (unsigned i = 0; i < nw; i++) {
        uint8_t *got = malloc(w[i].len), *want = malloc(w[i].len);
        if (!got || !want) {
            fz_die("out of memory");
        }
        int r = ct_image_pread(img, got, w[i].len, w[i].off);
        if (r < 0) {
            free(got);
            free(want);
            return false;
        }
        if (w[i].zero) {
            memset(want, 0, w[i].len);
        } else {
            pattern(want, w[i].len, w[i].off, w[i].seed);
        }
        if (memcmp(got, want, w[i].len) != 0) {
            size_t k = 0;
            while (got[k] == want[k]) {
                k++;
            }
            fz_die("%s: %s of %llu bytes at %llu reads back wrong: first difference at guest "
                   "offset %llu (got 0x%02x, want 0x%02x)",
                   when, w[i].zero ? "zero write" : "write", (unsigned long long)w[i].len,
                   (unsigned long long)w[i].off, (unsigned long long)(w[i].off + k), got[k],
                   want[k]);
        }
        free(got);
        free(want);
    }
    return true;
}

/* Drop remembered writes overlapping [off, off+len): their bytes are no longer known. */
static void forget_range(struct written *w, unsigned *nw, uint64_t off, uint64_t len)
{
    unsigned k = 0;
    for (unsigned i = 0; i < *nw; i++) {
        if (w[i].off + w[i].len <= off || w[i].off >= off + len) {
            w[k++] = w[i];
        }
    }
    *nw = k;
}

static void write_phase(const uint8_t *data, size_t size)
{
    char path[64];
    int fd = fz_memfd(data, size, path, sizeof(path));
    struct ct_image *img = NULL;
    struct ct_err err = {0};
    struct ct_open_opts o = {.format = "qcow2",
                             .flags = CT_OPEN_WRITE | CT_OPEN_NO_BACKING | CT_OPEN_ALLOW_CORRUPT,
                             .cache_bytes = size & 1 ? 1 : 0};
    /* A dirty image is repaired by the open itself; if that fails, skip it and repair below. */
    int r = ct_image_open(&img, path, &o, &err);
    check_open_error(r, &err, "ct_image_open(rw)");
    if (r < 0) {
        o.flags |= CT_OPEN_NO_REPAIR;
        r = ct_image_open(&img, path, &o, &err);
        check_open_error(r, &err, "ct_image_open(rw, no repair)");
        if (r < 0) {
            fz_close_fd(fd);
            return;
        }
    }
    struct ct_check_result res;
    struct fz_report rep = {0};
    r = ct_image_check(img, CT_FIX_ALL, &res, fz_report_cb, &rep, &err);
    check_open_error(r, &err, "ct_image_check(fix all)");
    uint64_t left_corrupt =
        res.corruptions -
        (res.corruptions_fixed < res.corruptions ? res.corruptions_fixed : res.corruptions);
    uint64_t left_leaks = res.leaks - (res.leaks_fixed < res.leaks ? res.leaks_fixed : res.leaks);
    bool repaired = r == 0 && left_corrupt == 0 && res.check_errors == 0;
    fz_log("repair: r=%d corruptions=%llu fixed=%llu leaks=%llu fixed=%llu errors=%llu -> %s", r,
           (unsigned long long)res.corruptions, (unsigned long long)res.corruptions_fixed,
           (unsigned long long)res.leaks, (unsigned long long)res.leaks_fixed,
           (unsigned long long)res.check_errors, repaired ? "repaired" : "not repaired");
    if (repaired) {
        struct ct_check_result again;
        struct fz_report rep2 = {0};
        r = ct_image_check(img, CT_FIX_NONE, &again, fz_report_cb, &rep2, &err);
        if (r < 0 || again.corruptions || again.check_errors || (left_leaks == 0 && again.leaks)) {
            fz_die("check -r all reported success (corruptions %llu, fixed %llu, leaks %llu, "
                   "fixed %llu) but an immediate re-check returns %d with %llu corruptions, %llu "
                   "leaks, %llu check errors:\n%s",
                   (unsigned long long)res.corruptions, (unsigned long long)res.corruptions_fixed,
                   (unsigned long long)res.leaks, (unsigned long long)res.leaks_fixed, r,
                   (unsigned long long)again.corruptions, (unsigned long long)again.leaks,
                   (unsigned long long)again.check_errors, rep2.text);
        }
    }

    uint64_t vsize = ct_image_size(img);
    struct ct_image_info info;
    unsigned cs = ct_image_info(img, &info) == 0 && info.cluster_size ? info.cluster_size : 65536;
    struct written w[8];
    unsigned nw = 0;
    bool all_ok = true;
    uint64_t wlen = (uint64_t)cs + 4097;
    const uint64_t offs[4] = {0, vsize / 3 & ~511ull, vsize / 2 + 1,
                              vsize > wlen ? vsize - wlen : 0};
    for (unsigned i = 0; i < 4 && vsize; i++) {
        uint64_t len = vsize - offs[i] < wlen ? vsize - offs[i] : wlen;
        if (!len) {
            continue;
        }
        uint8_t *buf = malloc(len);
        if (!buf) {
            fz_die("out of memory");
        }
        pattern(buf, len, offs[i], i + 1);
        r = ct_image_pwrite(img, buf, len, offs[i], i == 2 ? CT_WRITE_FUA : 0);
        free(buf);
        fz_log("write %llu+%llu -> %d", (unsigned long long)offs[i], (unsigned long long)len, r);
        if (r < 0) {
            all_ok = false;
            continue;
        }
        forget_range(w, &nw, offs[i], len);
        w[nw++] = (struct written){offs[i], len, i + 1, false};
        if (repaired) {
            verify_written(img, w, nw, "right after the write");
        }
    }
    if (vsize > 2ull * cs) {
        /* A zero write crossing a cluster boundary (partial + whole units), then a discard of
         * a whole cluster that was written above (its content is then unspecified). */
        uint64_t zo = cs > 1000 ? (uint64_t)cs - 1000 : cs / 2,
                 zl = (uint64_t)cs + 2000 < vsize - zo ? (uint64_t)cs + 2000 : vsize - zo;
        r = ct_image_pwrite_zeroes(img, zl, zo, CT_WRITE_UNMAP);
        fz_log("zero %llu+%llu -> %d", (unsigned long long)zo, (unsigned long long)zl, r);
        if (r < 0) {
            all_ok = false;
        } else {
            forget_range(w, &nw, zo, zl);
            w[nw++] = (struct written){zo, zl, 0, true};
            if (repaired) {
                verify_written(img, w, nw, "right after the zero write");
            }
        }
        uint64_t dof = vsize / 3 & ~((uint64_t)cs - 1);
        r = ct_image_discard(img, cs, dof);
        fz_log("discard %llu+%u -> %d", (unsigned long long)dof, cs, r);
        if (r < 0) {
            all_ok = false;
        } else {
            forget_range(w, &nw, dof, cs);
        }
    }
    if (vsize && vsize < (1ull << 40)) {
        r = ct_image_truncate(img, vsize + cs + 100, false, &err);
        check_open_error(r, &err, "ct_image_truncate");
        fz_log("grow to %llu -> %d", (unsigned long long)(vsize + cs + 100), r);
        if (r < 0) {
            all_ok = false;
        }
    }
    if (repaired && all_ok) {
        verify_written(img, w, nw, "before close");
    }
    r = ct_image_close(img, &err);
    fz_log("close -> %d", r);
    if (r < 0) {
        all_ok = false;
    }

    struct ct_open_opts ro = {.format = "qcow2", .flags = CT_OPEN_NO_BACKING | CT_OPEN_FORCE_SHARE};
    r = ct_image_open(&img, path, &ro, &err);
    if (r < 0) {
        if (repaired) {
            fz_die("the repaired image no longer opens after writes and close: %s", err.msg);
        }
        fz_close_fd(fd);
        return;
    }
    struct fz_report rep3 = {0};
    r = ct_image_check(img, CT_FIX_NONE, &res, fz_report_cb, &rep3, &err);
    fz_log("re-check: r=%d corruptions=%llu leaks=%llu errors=%llu", r,
           (unsigned long long)res.corruptions, (unsigned long long)res.leaks,
           (unsigned long long)res.check_errors);
    if (repaired) {
        /* Corruptions beyond the harmless missing-COPIED kind (see struct fz_report). */
        uint64_t harmful = res.corruptions > rep3.benign ? res.corruptions - rep3.benign : 0;
        if (r < 0 || harmful || res.check_errors) {
            fz_die("after a successful repair, writes and a close (all ok: %d), the check "
                   "returns %d and finds %llu corruptions (%u of them harmless missing-COPIED), "
                   "%llu check errors:\n%s",
                   all_ok, r, (unsigned long long)res.corruptions, rep3.benign,
                   (unsigned long long)res.check_errors, rep3.text);
        }
        if (all_ok && res.leaks) {
            fz_die("after a successful repair and successful writes and close, the check finds "
                   "%llu leaked clusters:\n%s",
                   (unsigned long long)res.leaks, rep3.text);
        }
        if (all_ok) {
            verify_written(img, w, nw, "after close and reopen");
        }
    }
    ct_image_close(img, NULL);
    fz_close_fd(fd);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char path[64];
    int fd = fz_memfd(data, size, path, sizeof(path));
    struct ct_image *img = NULL;
    struct ct_err err = {0};
    struct ct_open_opts o = {.format = "qcow2", .flags = CT_OPEN_NO_BACKING};
    int r = ct_image_open(&img, path, &o, &err);
    check_open_error(r, &err, "ct_image_open(ro)");
    if (r < 0) {
        fz_log("open: %s", err.msg);
        if (img) {
            fz_die("ct_image_open failed but set *out");
        }
        fz_close_fd(fd);
        return 0;
    }
    read_phase(img);
    ct_image_close(img, NULL);
    fz_close_fd(fd);
    write_phase(data, size);
    return 0;
}
