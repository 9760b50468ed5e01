/*
 * fuzz-qmp: the input is what a QMP client sends after the greeting (JSON messages; the first
 * is usually qmp_capabilities). The daemon's real QMP server, qmp_serve(), runs on one end of
 * a socketpair (fuzz-peer.c plays the client) with the daemon's block-node table holding one
 * writable qcow2 node, "disk0" (file disk.qcow2, 1 MiB, some data); the files raw.img (a raw
 * image) and base.qcow2 are there too for blockdev-add. Block jobs (src/daemon/blockjob.c) run
 * in their own threads; every run ends by cancelling them, as the daemon does at shutdown.
 *
 * Commands create and open files by name, so the target runs in a private directory under
 * /dev/shm (fz_private_dir) and, before serving, replaces every '/' of the input by '_' (and
 * the JSON escape \u002f by \u005f): every file name the server sees is then a plain name in
 * that directory. Each run starts from the same files and node table and ends with all nodes
 * closed and the directory emptied back to its template, so runs are independent. "quit" only
 * ends the served connection (its flag is the target's own).
 *
 * Oracles, besides the sanitizers: the server's output is the greeting and then only complete
 * JSON objects, one per line, each a {"return": ...} or {"error": {"class", "desc"}} reply
 * (or an event), and a reply's error has a non-empty description.
 */
#include <json-c/json.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "daemon/export.h"
#include "daemon/qmp.h"
#include "fuzz-common.h"
#include "fuzz-peer.h"

#define MAX_KEEP (4u << 20)

/* FUZZ_AVOID names (see fuzz-common.h): none open. (Retired, fixed: job-cancel-pending, a
 * cancel racing a job's automatic finalization; its input is in tests/fuzz/regressions/.) */

static uint8_t *disk_tmpl, *base_tmpl;
static size_t disk_len, base_len;

static void make_image(const char *name, int compat, unsigned cluster, uint8_t fill)
{
    struct ct_err err = {0};
    struct ct_create_opts co = {
        .format = "qcow2", .size = 1u << 20, .size_given = true, .cluster_size = cluster};
    co.compat = compat;
    if (ct_image_create(name, &co, &err) < 0) {
        fz_die("creating %s: %s", name, err.msg);
    }
    struct ct_image *img;
    struct ct_open_opts o = {.format = "qcow2", .flags = CT_OPEN_WRITE};
    if (ct_image_open(&img, name, &o, &err) < 0) {
        fz_die("opening %s: %s", name, err.msg);
    }
    uint8_t buf[8192];
    memset(buf, fill, sizeof(buf));
    if (ct_image_pwrite(img, buf, sizeof(buf), 0, 0) < 0 ||
        ct_image_pwrite(img, buf, 4096, 512u << 10, 0) < 0 || ct_image_close(img, &err) < 0) {
        fz_die("writing %s failed", name);
    }
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    fz_verbose = getenv("FUZZ_VERBOSE") != NULL;
    signal(SIGPIPE, SIG_IGN);
    fz_private_dir("fuzz-qmp", argc, argv);
    make_image("disk.qcow2", 3, 65536, 0x5a);
    make_image("base.qcow2", 2, 4096, 0xa5);
    disk_tmpl = fz_slurp("disk.qcow2", &disk_len);
    base_tmpl = fz_slurp("base.qcow2", &base_len);
    fz_clear_dir(NULL);
    return 0;
}

static void serve(int fd, void *opaque)
{
    int quit = 0;
    qmp_serve(fd, &quit);
}

/* Every '/' becomes '_', and \u002f (any case) becomes \u005f. */
static uint8_t *sanitize(const uint8_t *data, size_t size)
{
    uint8_t *s = malloc(size ? size : 1);
    if (!s) {
        fz_die("out of memory");
    }
    memcpy(s, data, size);
    for (size_t i = 0; i < size; i++) {
        if (s[i] == '/') {
            s[i] = '_';
        }
        if (i + 5 < size && s[i] == '\\' && s[i + 1] == 'u' && s[i + 2] == '0' && s[i + 3] == '0' &&
            s[i + 4] == '2' && (s[i + 5] == 'f' || s[i + 5] == 'F')) {
            s[i + 4] = '5';
        }
    }
    return s;
}

static void check_output(const uint8_t *buf, size_t len)
{
    size_t pos = 0;
    unsigned line = 0;
    while (pos < len) {
        const uint8_t *end = memmem(buf + pos, len - pos, "\r\n", 2);
        if (!end) {
            fz_die("output line %u is not terminated by CRLF", line);
        }
        size_t n = (size_t)(end - (buf + pos));
        char *text = strndup((const char *)buf + pos, n);
        if (!text) {
            fz_die("out of memory");
        }
        json_tokener *tok = json_tokener_new();
        json_object *o = json_tokener_parse_ex(tok, text, (int)n);
        bool whole = json_tokener_get_error(tok) == json_tokener_success &&
                     json_tokener_get_parse_end(tok) == n;
        json_tokener_free(tok);
        if (!o || !whole || json_object_get_type(o) != json_type_object) {
            fz_die("output line %u is not one JSON object: %.200s", line, text);
        }
        json_object *v, *cls, *desc;
        if (line == 0) {
            if (!json_object_object_get_ex(o, "QMP", &v)) {
                fz_die("the first line is not the QMP greeting: %.200s", text);
            }
        } else if (json_object_object_get_ex(o, "error", &v)) {
            if (!json_object_object_get_ex(v, "class", &cls) ||
                !json_object_object_get_ex(v, "desc", &desc) ||
                json_object_get_type(cls) != json_type_string ||
                json_object_get_type(desc) != json_type_string || !*json_object_get_string(desc)) {
                fz_die("malformed error reply: %.200s", text);
            }
        } else if (!json_object_object_get_ex(o, "return", &v) &&
                   !json_object_object_get_ex(o, "event", &v)) {
            fz_die("output line %u is neither a reply nor an event: %.200s", line, text);
        }
        json_object_put(o);
        free(text);
        pos += n + 2;
        line++;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fz_write_file("disk.qcow2", disk_tmpl, disk_len);
    fz_write_file("base.qcow2", base_tmpl, base_len);
    static const uint8_t raw[4096] = {1, 2, 3, 4};
    fz_write_file("raw.img", raw, sizeof(raw));
    struct ct_err err = {0};
    if (node_add("disk0", "disk.qcow2", "qcow2", true, &err) < 0) {
        fz_die("node_add: %s", err.msg);
    }
    uint8_t *in = sanitize(data, size);
    struct fz_peer_out out;
    fz_peer_run(in, size, serve, NULL, MAX_KEEP, &out);
    fz_log("%.*s", (int)(out.len < 8192 ? out.len : 8192), (const char *)out.buf);
    if (out.total <= out.len) {
        check_output(out.buf, out.len);
    }
    free(in);
    blockjob_cancel_all(); /* as cowtreed does before closing its nodes */
    node_close_all();
    fz_clear_dir(NULL);
    return 0;
}
