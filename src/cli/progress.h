/*
 * Progress display for cowtree-img -p, as qemu-img prints it: "    (12.34/100%)" lines
 * rewritten with \r when stdout is not a terminal; on a terminal, an updating bar with the
 * rate and the time left.
 */
#ifndef CT_CLI_PROGRESS_H
#define CT_CLI_PROGRESS_H

#include <stdbool.h>
#include <stdint.h>

struct cli_progress {
    bool on, tty, started;
    double last_pct;
    uint64_t t0_ns, last_ns;
};

/* Start (prints the 0% state when on). */
void cli_progress_init(struct cli_progress *p, bool on);
/* Report done/total bytes; prints when the percentage moved by 1 or more (or the bar's
 * refresh interval passed on a terminal). */
void cli_progress_update(struct cli_progress *p, uint64_t done, uint64_t total);
/* Print the final state and the newline. */
void cli_progress_end(struct cli_progress *p);

#endif
