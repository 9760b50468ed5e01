/*
 * Internals of the snapshot manager, shared by the files of src/manager/ (one header with a
 * section per file, as block/qcow2.h does). Nothing here prints or exits.
 *
 * The model. Every command loads the whole catalog into a struct m_cat (domains, their disks
 * and snapshots, and the global table of image files), plans on that in-memory copy, and ends
 * by writing back the domains it changed and the image table, in one SQL transaction that is
 * the last step of the operation's journaled plan (journal.c).
 *
 * Images. Every file a domain reads is a row of the image table, keyed by its absolute path,
 * with the backing link the catalog expects it to have. `owned` images belong to cowtree's
 * bookkeeping: they may be written, merged and removed when no longer needed. Images that are
 * not owned (backing files that existed before `define`, files pinned by --no-metadata or
 * --metadata deletes, files learnt from --redefine) are never written or removed by merges.
 *
 * References (invariant R). An image's active state must not change while any of these
 * refers to it: it is a disk's top (it is the live disk, and the only writable state), it is
 * the backing file of another image, it is the state image of an external snapshot, or it is
 * the materialized state of an internal snapshot (`mat`). An image must not be removed while
 * any of those hold or it still holds internal snapshots (catalog or not). An owned image that
 * no reference holds is merged out of its chain (collapse, snapshot.c): removed when nothing
 * backs onto it, else committed into by its only child or pulled into each child, whichever is
 * allowed and copies fewer bytes.
 */
#ifndef CT_MANAGER_INT_H
#define CT_MANAGER_INT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cowtree/cowtree.h"
#include "manager/manager.h"

struct sqlite3;

/* ---- util.c ---- */

/* Allocation helpers: small allocations abort on failure (as glib's g_malloc). */
void *mgr_xmalloc(size_t n);
void *mgr_xcalloc(size_t n, size_t sz);
void *mgr_xrealloc(void *p, size_t n);
char *mgr_xstrdup(const char *s); /* NULL -> NULL */
char *mgr_xasprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Replace *slot with a copy of s (freeing the old value). */
void mgr_setstr(char **slot, const char *s);
bool mgr_streq(const char *a, const char *b); /* NULL-safe */

struct sbuf {
    char *s;
    size_t len, cap;
};
void sb_addf(struct sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void sb_adds(struct sbuf *b, const char *s);
void sb_add_xml(struct sbuf *b, const char *s); /* escaped for text and '...' attributes */
/* Take the string (never NULL: "" for an empty buffer). */
char *sb_steal(struct sbuf *b);

/* Absolute, normalised form of a path: realpath() when it exists, else realpath() of the
 * directory joined with the last component. Returns NULL (errno set) when neither works. */
char *mgr_abspath(const char *path);
bool mgr_file_exists(const char *path);
/* Directory of path (owned). */
char *mgr_dirname(const char *path);
/* Base name without its last ".suffix" (owned): "/a/vm1.qcow2" -> "vm1". */
char *mgr_stem(const char *path);
/* fsync the directory holding path (best effort: errors are returned, not fatal). */
int mgr_sync_dir(const char *path);
/* Remove a file and make the removal durable; a missing file is success. */
int mgr_unlink(const char *path, struct ct_err *err);
/* A random RFC 4122 version 4 UUID string (37 bytes with the NUL). */
int mgr_uuid_generate(char out[37]);
bool mgr_uuid_valid(const char *s);
/* Snapshot and domain names: not empty, no '/', not starting with '.', no control chars. */
int mgr_check_name(const char *what, const char *name, struct ct_err *err);

/* ---- catalog.c: the model and its SQLite storage ---- */

enum m_kind { MK_NO = 0, MK_INTERNAL = 1, MK_EXTERNAL = 2 };

struct m_image {
    char *path;
    char *domain; /* domain whose disk uses it (NULL for a base shared by several) */
    char *target;
    char *format;
    char *backing; /* absolute path the catalog expects as backing, or NULL */
    char *backing_fmt;
    bool owned;
};

struct m_snapdisk {
    char *target;
    enum m_kind kind;
    char *image;  /* internal: the file holding it; external: the state image; no: top then */
    char *file;   /* external: the overlay made when the snapshot was taken (may be NULL) */
    char *driver; /* external: the overlay's format */
    char *mat;    /* internal: an image whose active state is this snapshot's (or NULL) */
};

struct m_snap {
    char *name, *desc, *state, *parent;
    int64_t ctime, seq;
    bool protect, valid, disk_only;
    struct m_snapdisk *disks;
    size_t nd;
};

struct m_disk {
    char *target, *top, *format;
};

struct m_domain {
    char *name, *uuid, *type, *xml, *current, *origin;
    int64_t created;
    struct m_disk *disks;
    size_t nd;
    struct m_snap **snaps;
    size_t ns;
    bool dirty;   /* write back at the end */
    bool removed; /* delete from the catalog */
};

struct m_cat {
    struct m_domain **doms;
    size_t nd;
    struct m_image **imgs;
    size_t ni;
    bool images_dirty;
    int64_t next_seq;
};

void m_cat_free(struct m_cat *c);
void m_domain_free(struct m_domain *d);
void m_snap_free(struct m_snap *s);

struct m_domain *m_domain_find(struct m_cat *c, const char *name);
struct m_snap *m_snap_find(struct m_domain *d, const char *name);
struct m_disk *m_disk_find(struct m_domain *d, const char *target_or_path);
struct m_snapdisk *m_snapdisk_find(struct m_snap *s, const char *target);
struct m_image *m_image_find(struct m_cat *c, const char *path);
struct m_image *m_image_add(struct m_cat *c, const char *path, const char *domain,
                            const char *target, const char *format, const char *backing,
                            const char *backing_fmt, bool owned);
void m_image_remove(struct m_cat *c, const char *path);
/* Remove snapshot s from d: its children get its parent; returns nothing. Frees s. */
void m_snap_remove(struct m_domain *d, struct m_snap *s);
/* Replace every reference to path `from` by `to` (tops, snapshot files, backing links). */
void m_retarget(struct m_cat *c, const char *from, const char *to);
/* Number of images whose expected backing is path, and the first of them. */
size_t m_children(struct m_cat *c, const char *path, struct m_image **first);
/* Is path's active state referenced (invariant R, without the file's own snapshots)? Tells
 * why in `why` when not NULL. */
bool m_active_referenced(struct m_cat *c, const char *path, char **why);
/* Does an image of another domain read the snapshot's state (a linked clone)? */
bool m_snap_has_clones(struct m_cat *c, const struct m_domain *d, const struct m_snap *s,
                       char **clone_dom);
/* Forget (catalog rows only, files stay) images cowtree may not remove that nothing uses. */
void m_forget_unused_unowned(struct m_cat *c);
/* Is path named by any snapshot (as holder, state, or mat) or a top? */
bool m_named_by_snapshot(struct m_cat *c, const char *path);

int cat_open(struct mgr *m, struct ct_err *err);
void cat_close(struct mgr *m);
int cat_load(struct mgr *m, struct m_cat **out, struct ct_err *err);
/* SQL that writes back the changed domains and the image table. */
char *cat_sql(const struct m_cat *c);
/* Run sql in one transaction. */
int cat_exec_txn(struct mgr *m, const char *sql, struct ct_err *err);
int cat_exec(struct mgr *m, const char *sql, struct ct_err *err);

struct qmp;
struct mgr {
    char *home;
    int lock_fd;
    struct sqlite3 *db;
    struct mgr_opts opts;
    unsigned kill_point; /* counter of journal kill points passed */
    char *rundir;        /* HOME/run: the daemon's home */
    struct qmp *qmp;     /* connection to the daemon, opened on first use */
};

/* ---- probe.c: what the files say (cached per operation, simulated by planning) ---- */

struct m_probe {
    char *path;
    int err; /* 0, or the error met opening it */
    char *format;
    uint64_t size;
    uint64_t alloc; /* bytes this layer allocates (data or zero) */
    char **snaps;   /* internal snapshot names */
    size_t nsnaps;
    char *backing; /* resolved absolute backing path, or NULL */
    char *backing_fmt;
    bool synthetic; /* made by planning, not read */
};

struct m_probes {
    struct m_probe **v;
    size_t n;
};

void m_probes_free(struct m_probes *p);
/* Probe path (format fmt, NULL = as the catalog says or probe). Cached. On failure returns
 * NULL with err set. */
struct m_probe *m_probe_get(struct m_probes *p, const char *path, const char *fmt,
                            struct ct_err *err);
/* A probe entry for a file the plan creates (or replaces the entry). */
struct m_probe *m_probe_synth(struct m_probes *p, const char *path, const char *fmt, uint64_t size,
                              const char *backing, const char *backing_fmt);
void m_probe_drop(struct m_probes *p, const char *path);
/* Open images without taking or testing locks (a running domain's files are the daemon's). */
void m_probe_set_force_share(bool on);
bool m_probe_has_snap(const struct m_probe *pr, const char *name);
void m_probe_add_snap(struct m_probe *pr, const char *name);
void m_probe_del_snap(struct m_probe *pr, const char *name);
/* Does the internal snapshot `name` of path differ from its active state (metadata diff)? */
int m_probe_snap_differs(const char *path, const char *fmt, const char *name, bool *differs,
                         struct ct_err *err);
/* Read the snapshot names and backing of a file directly (no cache). */
int m_read_image(const char *path, const char *fmt, struct m_probe *out, struct ct_err *err);

/* ---- journal.c: plans ---- */

enum m_step_kind {
    ST_CREATE_OVERLAY,  /* a=path b=backing c=backing fmt n=size (0 = backing's) */
    ST_INTERNAL_CREATE, /* a=path b=name c=format n=date */
    ST_INTERNAL_APPLY,  /* a=path b=name c=format */
    ST_INTERNAL_DELETE, /* a=path b=name c=format */
    ST_MATERIALIZE,     /* a=new path b=holder c=snapshot d=backing e=backing fmt n=size */
    ST_COMMIT,          /* a=top b=base c=base fmt d=top fmt */
    ST_PULL,            /* a=image b=new backing (NULL = none) c=its fmt d=image fmt */
    ST_REBASE,          /* a=image b=new backing c=fmt d=old backing e=old fmt (unsafe) */
    ST_REMOVE,          /* a=path */
    ST_COPY,            /* a=source top b=dest c=dest fmt d=dest backing e=its fmt n=reuse */
    ST_CATALOG,         /* a=SQL */
    ST_LIVE,            /* a=JSON actions through QMP (live.c) n=1: irreversible */
    ST__MAX,
};

struct m_step {
    enum m_step_kind kind;
    char *a, *b, *c, *d, *e;
    int64_t n;
    uint64_t bytes;
    bool done;
};

struct mgr_plan {
    int64_t id;
    char *op, *domain;
    struct m_step *steps;
    size_t ns;
    char **notes; /* human remarks for dry runs ("kept X: holds internal snapshots") */
    size_t nnotes;
};

struct m_step *plan_add(struct mgr_plan *p, enum m_step_kind kind, const char *a, const char *b,
                        const char *c, const char *d, const char *e, int64_t n, uint64_t bytes);
void plan_note(struct mgr_plan *p, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
struct mgr_plan *plan_new(const char *op, const char *domain);
const char *step_kind_name(enum m_step_kind k);
/* Journal the plan (steps + final catalog SQL), then run it. On a failure before any
 * irreversible step, done steps are undone and the catalog is untouched. */
int plan_run(struct mgr *m, struct mgr_plan *p, const char *sql, struct ct_err *err);
/* Roll forward (or back) every unfinished plan. */
int journal_recover(struct mgr *m, unsigned *nplans, struct ct_err *err);
int journal_pending(struct mgr *m, bool *pending, struct ct_err *err);

/* ---- snapshot.c / block.c shared ---- */

/* Per-operation context: catalog model, file probes, plan being built. */
struct m_ctx {
    struct mgr *m;
    struct m_cat *cat;
    struct m_probes probes;
    struct mgr_plan *plan;
    char **created; /* paths this plan creates (name collision checks) */
    size_t ncreated;
    /* Set by ctx_verify_domain when the domain runs (live.c): the plan is made live. */
    bool live_checked, live;
    char *live_dom;
    char **live_tops; /* each disk's top when the operation began, in disk order */
    size_t nlive_tops;
    char **inuse; /* every file the daemon has open */
    size_t ninuse;
    char *extra_sql; /* appended to the catalog step's SQL */
};

void ctx_init(struct m_ctx *x, struct mgr *m);
void ctx_fini(struct m_ctx *x);
/* Check that every image of the domain matches the catalog (exists, format, backing link,
 * internal snapshots named by snapshots). */
int ctx_verify_domain(struct m_ctx *x, struct m_domain *d, struct ct_err *err);
/* Pick a free file name "<dir>/<stem><suffix>[-N]" not on disk, in the catalog, or planned. */
char *ctx_free_name(struct m_ctx *x, const char *dir, const char *stem, const char *suffix);
bool ctx_path_taken(struct m_ctx *x, const char *path);
void ctx_note_created(struct m_ctx *x, const char *path);
/* Merge out owned images no longer referenced, starting from path (see the file comment).
 * strict: an image that cannot be merged out is an error (-CT_E_BUSY) instead of kept. */
int ctx_collapse(struct m_ctx *x, const char *path, bool strict, struct ct_err *err);
/* Finish: SQL of the model, run the plan (or keep it for a dry run). */
int ctx_finish(struct m_ctx *x, bool dry_run, struct mgr_plan **plan_out, struct ct_err *err);
/* Is the disk's state captured by the current snapshot (no unsaved changes)? */
int ctx_disk_clean(struct m_ctx *x, struct m_domain *d, struct m_disk *disk, bool *clean,
                   struct ct_err *err);
/* Materialize internal snapshot sd of snap on disk: plan a new image whose active state is
 * the snapshot's (backing: the holder's backing). Sets sd->mat. */
int ctx_materialize(struct m_ctx *x, struct m_domain *d, struct m_snap *s, struct m_snapdisk *sd,
                    struct ct_err *err);
/* Snapshots of any domain whose state some image of another domain depends on. */
bool ctx_snapshot_has_clones(struct m_ctx *x, struct m_domain *d, struct m_snap *s,
                             char **clone_dom);

/* ---- snapxml.c ---- */

char *snapxml_format(const struct m_domain *d, const struct m_snap *s);

/* Parsed <domainsnapshot> input. */
struct snapxml_disk {
    char *name;
    int kind; /* -1 = not said */
    char *file;
    char *driver;
};
struct snapxml_in {
    char *name, *desc, *state, *parent;
    int64_t ctime;
    bool has_ctime;
    char *memory; /* "no" or NULL when absent */
    struct snapxml_disk *disks;
    size_t nd;
    /* <domain> disks: target -> source file */
    char **dom_targets, **dom_sources;
    size_t ndom;
};
int snapxml_parse_input(const char *xml, struct snapxml_in *out, struct ct_err *err);
void snapxml_in_free(struct snapxml_in *in);

/* ---- domain.c ---- */

/* Register the backing chain below top (not owned). */
int dom_register_chain(struct m_ctx *x, const char *domain, const char *target, const char *top,
                       const char *fmt, bool owned_top, struct ct_err *err);

/* ---- live.c: running domains ---- */

void live_close(struct mgr *m);
/* Connect to the home's daemon: 1 connected, 0 none runs, < 0 error. */
int live_connect(struct mgr *m, struct ct_err *err);
/* Invariant L1 (live.c). A stale running row becomes shut off / crashed. */
int live_domain_running(struct mgr *m, const struct m_domain *d, bool *running, struct ct_err *err);
int live_fill_state(struct mgr *m, const struct m_domain *d, struct mgr_domstate *st,
                    struct ct_err *err);
bool live_jobs_pending(struct mgr *m, const char *dom);
/* ctx_verify_domain found the domain running: record its tops and the daemon's files. */
int live_ctx_enter(struct m_ctx *x, struct m_domain *d, struct ct_err *err);
/* Make x's plan for running domain d live (L3): called by ctx_finish. */
int live_plan(struct m_ctx *x, struct ct_err *err);
/* Execute / undo an ST_LIVE step. */
int live_step_do(struct mgr *m, const struct m_step *s, struct ct_err *err);
int live_step_undo(struct mgr *m, const struct m_step *s, struct ct_err *err);
int live_job_step(struct mgr *m, const struct m_step *s, struct ct_err *err);
enum live_job_op { LJ_COMMIT, LJ_PULL, LJ_COPY };
/* Start the job x planned for disk k of d in the daemon (instead of ctx_finish), and wait
 * as o says. Returns an enum mgr_job_result or < 0. */
int live_job_begin(struct m_ctx *x, struct m_domain *d, struct m_disk *k, enum live_job_op op,
                   const struct mgr_block_opts *o, struct ct_err *err);
/* MGR_LIVE_DONE planning: drop the steps whose work the daemon's job did, then finish. */
int live_job_done_finish(struct m_ctx *x, struct mgr_plan **plan_out, struct ct_err *err);
/* Finish or forget jobs that ended while no command waited (mgr_open). */
int live_jobs_sync(struct mgr *m, struct ct_err *err);
/* Run one offline step (journal.c), for live steps finished without the daemon. */
int journal_step_do(struct mgr *m, const struct m_step *s, struct ct_err *err);

#endif
