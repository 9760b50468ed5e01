/* Progress display for -p; see progress.h. */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli/cli-util.h"
#include "cli/progress.h"

#define BAR_WIDTH      30
#define TTY_REFRESH_NS 200000000ull

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void print_plain(double pct)
{
    printf("    (%3.2f/100%%)\r", pct);
    fflush(stdout);
}

static void print_bar(struct cli_progress *p, double pct, uint64_t done, uint64_t total)
{
    char bar[BAR_WIDTH + 1];
    int fill = (int)(pct / 100.0 * BAR_WIDTH);
    for (int i = 0; i < BAR_WIDTH; i++) {
        bar[i] = i < fill ? '#' : (i == fill ? '>' : '.');
    }
    bar[BAR_WIDTH] = '\0';
    double secs = (double)(mono_ns() - p->t0_ns) / 1e9;
    double rate = secs > 0 ? (double)done / secs : 0;
    char rs[32], eta[32] = "--:--";
    cli_size_str((uint64_t)rate, rs, sizeof(rs));
    if (rate > 0 && total >= done) {
        uint64_t left = (uint64_t)((double)(total - done) / rate);
        snprintf(eta, sizeof(eta), "%02" PRIu64 ":%02" PRIu64, left / 60, left % 60);
    }
    printf("\r[%s] %6.2f%%  %10s/s  ETA %s \033[K", bar, pct, rs, eta);
    fflush(stdout);
}

void cli_progress_init(struct cli_progress *p, bool on)
{
    memset(p, 0, sizeof(*p));
    p->on = on;
    if (!on) {
        return;
    }
    p->tty = isatty(STDOUT_FILENO) == 1;
    p->t0_ns = mono_ns();
    p->started = true;
    if (p->tty) {
        print_bar(p, 0, 0, 0);
    } else {
        print_plain(0);
    }
}

void cli_progress_update(struct cli_progress *p, uint64_t done, uint64_t total)
{
    if (!p->on) {
        return;
    }
    double pct = total ? (double)done * 100.0 / (double)total : 100.0;
    if (pct > 100.0) {
        pct = 100.0;
    }
    if (p->tty) {
        uint64_t now = mono_ns();
        if (now - p->last_ns >= TTY_REFRESH_NS || pct >= 100.0) {
            p->last_ns = now;
            print_bar(p, pct, done, total);
        }
        return;
    }
    if (pct - p->last_pct >= 1.0 || (pct >= 100.0 && p->last_pct < 100.0)) {
        p->last_pct = pct;
        print_plain(pct);
    }
}

void cli_progress_end(struct cli_progress *p)
{
    if (!p->on || !p->started) {
        return;
    }
    if (p->tty) {
        printf("\n");
    } else {
        print_plain(p->last_pct);
        printf("\n");
    }
    fflush(stdout);
    p->started = false;
}
