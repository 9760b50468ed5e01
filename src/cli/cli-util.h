/* Helpers shared by the command-line tools: sizes, messages, option values. */
#ifndef CT_CLI_UTIL_H
#define CT_CLI_UTIL_H

#include <stdbool.h>
#include <stdint.h>

#include "cowtree/cowtree.h"

extern const char *cli_prog;

/* Parse "4096", "64k", "1.5G", "2T" (binary units, as qemu-img). Returns 0 or -EINVAL. */
int cli_parse_size(const char *s, uint64_t *out);
/* qemu-img's human size: "64 KiB", "1.95 GiB", "512 B". Writes into buf. */
const char *cli_size_str(uint64_t v, char *buf, size_t len);
/* "prog: msg" on stderr. */
void cli_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* "prog: FILE: msg" from an err. */
void cli_error_err(const char *file, const struct ct_err *err);
/*
 * qemu's cache modes (-t / -T) as open flags for images written: writeback and none (0),
 * writethrough and directsync (CT_OPEN_WRITETHROUGH), unsafe (CT_OPEN_NO_FLUSH). none and
 * directsync do not bypass the page cache (no O_DIRECT: docs/cli-contract.md). Prints
 * "Invalid cache option: MODE" and returns -1 for any other name.
 */
int cli_cache_flags(const char *mode, unsigned *flags);
/* The backing-directory policy from COWTREE_BACKING_DIRS (NULL when unset). */
const char *cli_backing_dirs(void);
/* Enable fault injection from COWTREE_FAULT; report counts at exit when asked. */
void cli_setup_faults(void);

#endif
