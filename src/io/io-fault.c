/*
 * Fault injection: fail the k-th write or flush with EIO/ENOSPC, or stop the process dead
 * (SIGKILL, no cleanup) at that call. Counting is process-wide, over every file, so a driver
 * can enumerate k = 1..N for one operation (tests/crash). Configured by the tools from the
 * COWTREE_FAULT environment variable; libraries never read the environment.
 */
#include <errno.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "io/io.h"

enum fault_action { ACT_EIO, ACT_ENOSPC, ACT_KILL };
struct fault_rule {
    int op; /* CT_FAULT_WRITE, CT_FAULT_FLUSH or -1 for any */
    uint64_t k;
    enum fault_action action;
};

static bool fault_enabled;
static struct fault_rule rules[8];
static unsigned nrules;
static uint64_t nwrites, nflushes, nany;

int ct_fault_configure(const char *spec)
{
    nrules = 0;
    fault_enabled = false;
    if (!spec || !*spec) {
        return 0;
    }
    char *copy = strdup(spec);
    if (!copy) {
        return -ENOMEM;
    }
    int ret = 0;
    char *save = NULL;
    for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        if (strcmp(tok, "count") == 0) {
            continue;
        }
        char op[16], act[16];
        unsigned long long k;
        if (sscanf(tok, "%15[a-z]:%llu:%15[a-z]", op, &k, act) != 3 || k == 0 ||
            nrules == sizeof(rules) / sizeof(rules[0])) {
            ret = -EINVAL;
            break;
        }
        struct fault_rule *r = &rules[nrules];
        if (strcmp(op, "write") == 0) {
            r->op = CT_FAULT_WRITE;
        } else if (strcmp(op, "flush") == 0) {
            r->op = CT_FAULT_FLUSH;
        } else if (strcmp(op, "any") == 0) {
            r->op = -1;
        } else {
            ret = -EINVAL;
            break;
        }
        if (strcmp(act, "eio") == 0) {
            r->action = ACT_EIO;
        } else if (strcmp(act, "enospc") == 0) {
            r->action = ACT_ENOSPC;
        } else if (strcmp(act, "kill") == 0) {
            r->action = ACT_KILL;
        } else {
            ret = -EINVAL;
            break;
        }
        r->k = k;
        nrules++;
    }
    free(copy);
    if (ret == 0) {
        fault_enabled = true;
    } else {
        nrules = 0;
    }
    return ret;
}

void ct_fault_counts(uint64_t *writes, uint64_t *flushes)
{
    *writes = __atomic_load_n(&nwrites, __ATOMIC_RELAXED);
    *flushes = __atomic_load_n(&nflushes, __ATOMIC_RELAXED);
}

int ct_fault_check(enum ct_fault_op op)
{
    if (__builtin_expect(!fault_enabled, 1)) {
        return 0;
    }
    /* Atomic: copy jobs write from worker threads (one writer at a time per target, so the
     * K-th write of a given run is still the same write). */
    uint64_t n =
        __atomic_add_fetch(op == CT_FAULT_WRITE ? &nwrites : &nflushes, 1, __ATOMIC_RELAXED);
    uint64_t any = __atomic_add_fetch(&nany, 1, __ATOMIC_RELAXED);
    for (unsigned i = 0; i < nrules; i++) {
        const struct fault_rule *r = &rules[i];
        bool hit = r->op < 0 ? any == r->k : (r->op == (int)op && n == r->k);
        if (!hit) {
            continue;
        }
        switch (r->action) {
        case ACT_KILL:
            kill(getpid(), SIGKILL);
            _exit(137); /* not reached */
        case ACT_EIO:
            return -EIO;
        case ACT_ENOSPC:
            return -ENOSPC;
        }
    }
    return 0;
}
