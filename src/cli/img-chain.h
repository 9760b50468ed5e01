/* Chain verbs of cowtree-img (commit, rebase, pull, convert, measure) and their helpers. */
#ifndef CT_CLI_IMG_CHAIN_H
#define CT_CLI_IMG_CHAIN_H

#include <stdbool.h>
#include <stdint.h>

#include "cli/progress.h"
#include "cowtree/cowtree.h"

struct ct_job;
struct ct_job_opts;

int img_commit(int argc, char **argv);
int img_rebase(int argc, char **argv);
int img_pull(int argc, char **argv);
int img_convert(int argc, char **argv);
int img_measure(int argc, char **argv);

/* ---- img-chain-common.c ---- */

/* Parse qemu-img's -o key=value[,...] for qcow2/raw creation (modifies s). Unknown keys are
 * an error unless lenient (measure ignores what does not change sizes). */
int chain_parse_create_opts(char *s, struct ct_create_opts *o, bool lenient);

/* Resolve a backing name as stored in overlay: relative names are relative to the overlay's
 * directory. Owned result (NULL on out of memory). */
char *chain_resolve(const char *overlay, const char *name);

/* A link string to store in overlay so that it leads to target: preferred if it does, else
 * target's path relative to the overlay's directory, else its absolute path. Owned. */
char *chain_link_for(const char *overlay, const char *target, const char *preferred);

/* Are the two paths the same file? */
bool chain_same_file(const char *a, const char *b);

/* The index (1 = top's backing) of the layer of top's open chain that name designates: the
 * same file as name (relative to the current directory), or the layer whose link string in
 * the layer above equals name. -1 when none. */
int chain_find_layer(struct ct_image *top, const char *name);

/* Runs a job for a verb: progress display, Ctrl-C cancels. */
struct chain_runner {
    struct cli_progress progress;
};
/* Fill jo for a job run by r (speed in bytes/s, 0 = unlimited). */
void chain_job_opts(struct ct_job_opts *jo, struct chain_runner *r, bool progress, uint64_t speed);
/* Run the job; prints "cowtree-img: FILE: error" on failure. Returns 0 or 1 (exit status). */
int chain_run_job(struct ct_job *job, struct chain_runner *r, const char *file);

/* Parse -l's SNAPSHOT_PARAM: "snapshot.name=N", "snapshot.id=I" or "N". NULL if malformed. */
const char *chain_snapshot_param(const char *s);

#endif
