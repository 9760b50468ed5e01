/*
 * The snapshot manager: domains (named sets of disks), their snapshot trees, and the verbs
 * that change them, over the public image API and the job framework. Library code: nothing
 * here prints, exits or reads the environment; every failure is returned as a negative code
 * with a message in the caller's struct ct_err (STYLE section 8, E1-E2).
 *
 * Error codes the CLI maps to exit statuses:
 *   -ENOENT       unknown domain, disk, snapshot or file
 *   -EEXIST       duplicate name, or a file that exists without --reuse-external
 *   -CT_E_BUSY    refused: protected, unsaved changes without --force, base of branches...
 *   -CT_E_CORRUPT the catalog and the image files disagree (run reconcile)
 *   -EINVAL       bad input
 *   other         I/O and engine errors
 *
 * Concurrency: mgr_open() takes an exclusive lock on the home (flock on HOME/lock) held until
 * mgr_close(), so two cowtree processes never interleave operations on one home. It then
 * finishes (rolls forward, or back) any operation a killed process left in the journal,
 * before anything else is done.
 *
 * Lifetimes: every struct returned through an out pointer is owned by the caller and freed
 * with the matching *_free function.
 */
#ifndef CT_MANAGER_H
#define CT_MANAGER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "cowtree/cowtree.h"

struct mgr;
struct mgr_plan;

struct mgr_opts {
    const char *home; /* catalog directory (created if missing) */
    bool no_recover;  /* do not finish pending operations in mgr_open (for `recover`) */
    /* Test hook: called at every journal point (after the plan is written, after each step's
     * work and after its done mark), numbered from 1. May not return (kill -9). */
    void (*kill_point)(void *opaque, unsigned point);
    /* Progress of byte-moving steps (commit, pull, copy, materialize). */
    void (*progress)(void *opaque, const char *what, uint64_t done, uint64_t total);
    void *opaque;
    uint64_t speed; /* bytes per second for byte-moving steps, 0 = unlimited */
    /* Running domains (live.c): the daemon program `start` runs as `DAEMON --home DIR`
     * (NULL: "cowtreed" from PATH) and the QMP reply timeout (0: 60 s). */
    const char *daemon;
    int qmp_timeout_ms;
};

int mgr_open(struct mgr **out, const struct mgr_opts *opts, struct ct_err *err);
void mgr_close(struct mgr *m);
/* Change the rate limit for the following operations. */
void mgr_set_speed(struct mgr *m, uint64_t bytes_per_sec);
/* Finish every operation left unfinished by a killed process; *nplans says how many. */
int mgr_recover(struct mgr *m, unsigned *nplans, struct ct_err *err);

/* ---- Domains ---- */

struct mgr_disk_arg {
    const char *target; /* vda */
    const char *path;
    const char *format; /* NULL: probe the named file (never its backing files) */
};

int mgr_define(struct mgr *m, const char *name, const struct mgr_disk_arg *disks, size_t n,
               struct ct_err *err);
/* Define from a libvirt <domain> document; *name_out (owned) names the domain. */
int mgr_define_xml(struct mgr *m, const char *xml, char **name_out, struct ct_err *err);
enum mgr_undefine_flags {
    MGR_UNDEFINE_SNAPSHOTS = 1u << 0, /* forget snapshot metadata too (files stay) */
    MGR_UNDEFINE_STORAGE = 1u << 1,   /* remove the files cowtree made for the domain */
};
int mgr_undefine(struct mgr *m, const char *name, unsigned flags, struct ct_err *err);
int mgr_domain_names(struct mgr *m, char ***names, size_t *n, struct ct_err *err);
void mgr_strv_free(char **v, size_t n);

enum mgr_kind { MGR_KIND_NO = 0, MGR_KIND_INTERNAL = 1, MGR_KIND_EXTERNAL = 2 };
const char *mgr_kind_name(int kind);

struct mgr_disk_info {
    char *target, *top, *format;
    char **chain; /* top first, down to the last backing file */
    size_t nchain;
};

struct mgr_snapdisk_info {
    char *target;
    int kind;     /* enum mgr_kind */
    char *image;  /* internal: holder; external: state image; no: NULL */
    char *file;   /* external: the overlay made at snapshot time (may be NULL) */
    char *driver; /* external: overlay format */
    char *mat;    /* internal: materialized state image, or NULL */
};

struct mgr_snap_info {
    char *name, *desc, *state, *parent;
    int64_t ctime;
    bool current, protect, valid, disk_only;
    const char *location; /* "internal", "external" or "none" */
    size_t nchildren, ndescendants;
    struct mgr_snapdisk_info *disks;
    size_t nd;
};

struct mgr_image_info {
    char *path, *target, *format, *backing;
    bool owned;
};

struct mgr_domstate {
    bool running;
    const char *state;  /* "running" or "shut off" (static strings) */
    const char *reason; /* virsh's reasons: booted, shutdown, crashed, unknown */
    int64_t id;         /* virsh's Id while running, else -1 */
};

struct mgr_domain_info {
    char *name, *uuid, *type, *current, *origin;
    struct mgr_domstate run; /* running or not, from the catalog and the daemon */
    int64_t created;
    struct mgr_disk_info *disks;
    size_t nd;
    struct mgr_snap_info *snaps; /* in creation order */
    size_t ns;
    struct mgr_image_info *images; /* every catalog image of the domain */
    size_t ni;
};

int mgr_domain_get(struct mgr *m, const char *name, struct mgr_domain_info **out,
                   struct ct_err *err);
void mgr_domain_info_free(struct mgr_domain_info *d);
/* Index of snapshot name in d->snaps, or -1. */
ssize_t mgr_snap_index(const struct mgr_domain_info *d, const char *name);

/* snapshot-list selection (virsh's flags). current: start at the current snapshot (as from
 * does). disk_only: snapshots without memory state taken with --disk-only (libvirt: state
 * disk-snapshot; cowtree's domains are never running, so every state is shutoff). */
struct mgr_list_opts {
    bool roots, leaves, no_leaves, current, internal, external, disk_only, active, inactive;
    bool no_metadata;
    const char *from; /* children of this snapshot (all descendants with descendants) */
    bool descendants;
    bool topological; /* parents before children; else sorted by name */
    bool tree;        /* with from: include from itself */
};
/* Indices into d->snaps of the selected snapshots, in output order (owned). */
int mgr_snapshot_select(const struct mgr_domain_info *d, const struct mgr_list_opts *o,
                        size_t **idx, size_t *n, struct ct_err *err);

/* ---- Snapshots ---- */

struct mgr_diskspec {
    const char *disk; /* target or source path */
    int kind;         /* enum mgr_kind, or -1 when not given */
    const char *file;
    const char *driver;
};

struct mgr_create_opts {
    const char *name; /* NULL: the creation time in seconds */
    const char *desc;
    bool disk_only, reuse_external, no_metadata, atomic;
    const struct mgr_diskspec *specs;
    size_t nspecs;
};

int mgr_snapshot_create(struct mgr *m, const char *dom, const struct mgr_create_opts *o,
                        char **name_out, struct ct_err *err);
/* The <domainsnapshot> document snapshot-create-as would submit (--print-xml). */
char *mgr_snapshot_print_xml(const struct mgr_create_opts *o);
/* snapshot-create with a <domainsnapshot> document. With redefine, only metadata is
 * imported (after checking that the files hold what it says); current makes it current. */
int mgr_snapshot_create_xml(struct mgr *m, const char *dom, const char *xml,
                            const struct mgr_create_opts *flags, bool redefine, bool current,
                            char **name_out, struct ct_err *err);

enum mgr_op_flags {
    MGR_DRY_RUN = 1u << 0,
    MGR_FORCE = 1u << 1,
    MGR_DELETE_CHILDREN = 1u << 2,
    MGR_DELETE_CHILDREN_ONLY = 1u << 3,
    MGR_DELETE_METADATA = 1u << 4,
    MGR_LIVE_DONE = 1u << 8, /* internal: the daemon's job moved the data; plan the rest */
};

/* snap NULL: the current snapshot. *plan (optional) receives the plan, run or not. */
int mgr_snapshot_revert(struct mgr *m, const char *dom, const char *snap, unsigned flags,
                        struct mgr_plan **plan, struct ct_err *err);
int mgr_snapshot_delete(struct mgr *m, const char *dom, const char *snap, unsigned flags,
                        struct mgr_plan **plan, struct ct_err *err);
int mgr_snapshot_set_current(struct mgr *m, const char *dom, const char *snap, struct ct_err *err);
int mgr_snapshot_protect(struct mgr *m, const char *dom, const char *snap, bool on,
                         struct ct_err *err);
int mgr_snapshot_dumpxml(struct mgr *m, const char *dom, const char *snap, char **xml,
                         struct ct_err *err);

/* ---- Block jobs (the domain is never running: offline) ---- */

struct mgr_block_opts {
    const char *base; /* path or NULL */
    const char *top;  /* path or NULL (the active layer) */
    bool shallow, delete_layers, force;
    /* blockcopy */
    const char *dest, *format;
    bool reuse_external, pivot;
    /* Running domains (live jobs in the daemon). Without wait the job is left running (the
     * call returns 1); `blockjob` follows it. */
    bool wait;          /* wait for the end (implied by pivot, keep_overlay and finish) */
    bool active;        /* --active: the top may be the active layer (two-phase commit) */
    bool keep_overlay;  /* active commit: end by abort once synchronized (the top stays) */
    bool finish;        /* blockcopy: end by abort once synchronized (a point-in-time copy) */
    unsigned timeout_s; /* with wait: abort the job after this many seconds (0: never) */
};

/* Results of a live block job call (> 0). */
enum mgr_job_result {
    MGR_JOB_STARTED = 1, /* left running in the daemon */
    MGR_JOB_SYNCED = 2,  /* two-phase job waiting in its synchronized phase */
    MGR_JOB_DONE = 3,    /* finished (pivoted, or completed) */
    MGR_JOB_ABORTED = 4, /* ended without pivot (keep-overlay, finish, abort) */
};

struct mgr_jobinfo {
    bool exists;
    char type[32];   /* commit, active-commit, pull, copy */
    char status[32]; /* QEMU's JobStatus */
    uint64_t offset, len, speed;
    bool ready;
};
int mgr_blockjob_info(struct mgr *m, const char *dom, const char *disk, struct mgr_jobinfo *out,
                      struct ct_err *err);
/* End the job: pivot (two-phase jobs once ready) or abort; waits unless async. Returns an
 * enum mgr_job_result. */
int mgr_blockjob_end(struct mgr *m, const char *dom, const char *disk, bool pivot, bool async,
                     struct ct_err *err);
int mgr_blockjob_set_speed(struct mgr *m, const char *dom, const char *disk, uint64_t speed,
                           struct ct_err *err);

int mgr_blockcommit(struct mgr *m, const char *dom, const char *disk,
                    const struct mgr_block_opts *o, unsigned flags, struct mgr_plan **plan,
                    struct ct_err *err);
int mgr_blockpull(struct mgr *m, const char *dom, const char *disk, const struct mgr_block_opts *o,
                  unsigned flags, struct mgr_plan **plan, struct ct_err *err);
int mgr_blockcopy(struct mgr *m, const char *dom, const char *disk, const struct mgr_block_opts *o,
                  unsigned flags, struct mgr_plan **plan, struct ct_err *err);
/* A new domain whose disks are thin overlays on the snapshot's state (flatten: full copies
 * instead, independent of the source). */
int mgr_clone(struct mgr *m, const char *dom, const char *snap, const char *newdom, bool flatten,
              unsigned flags, struct mgr_plan **plan, struct ct_err *err);

/* ---- Running domains (live.c) ----
 *
 * A running domain's disks are open in cowtreed (one daemon per catalog home, in HOME/run)
 * and served over NBD; the verbs that change files then go through QMP. */

/* Start the daemon if needed, open and export every disk; *uris (owned) get the NBD URIs. */
int mgr_start(struct mgr *m, const char *dom, char ***uris, size_t *n, struct ct_err *err);
/* Flush and close the domain's disks in the daemon (stopping it when no domain runs). */
int mgr_shutdown(struct mgr *m, const char *dom, struct ct_err *err);
int mgr_domstate(struct mgr *m, const char *dom, struct mgr_domstate *st, struct ct_err *err);

/* ---- Reconcile ---- */

struct mgr_finding {
    char *path; /* file concerned (or NULL) */
    char *what; /* description of the disagreement */
    bool fixed; /* repaired by --fix */
    bool fixable;
    bool note; /* information, not a disagreement (e.g. a --no-metadata internal snapshot) */
};
int mgr_reconcile(struct mgr *m, const char *dom, bool fix, struct mgr_finding **out, size_t *n,
                  struct ct_err *err);
void mgr_findings_free(struct mgr_finding *f, size_t n);

/* ---- Plans (for --dry-run and reports) ---- */

struct mgr_step_view {
    const char *action; /* create, snapshot, apply, delete-snapshot, commit, pull, rebase,
                           remove, copy, materialize, catalog */
    const char *path;   /* the file acted on */
    const char *other;  /* commit: base; pull/rebase: new backing; copy: source; ... */
    const char *name;   /* internal snapshot name, when one is involved */
    uint64_t bytes;     /* estimated bytes moved */
    bool writes, creates, removes; /* what happens to path */
};
size_t mgr_plan_nsteps(const struct mgr_plan *p);
void mgr_plan_step(const struct mgr_plan *p, size_t i, struct mgr_step_view *v);
size_t mgr_plan_nnotes(const struct mgr_plan *p);
const char *mgr_plan_note(const struct mgr_plan *p, size_t i);
void mgr_plan_free(struct mgr_plan *p);

#endif
