/* A tiny test harness: "not ok" lines for failures, a summary line, exit 0/1. */
#ifndef CT_TEST_T_H
#define CT_TEST_T_H

#include <stdio.h>
#include <stdlib.h>

static int t_failed, t_count;

/* Counts one check; prints the failure prefix. The condition is evaluated exactly once. */
static inline int t_check_(int ok, const char *expr, const char *file, int line)
{
    t_count++;
    if (!ok) {
        t_failed++;
        printf("not ok %d - %s:%d: %s: ", t_count, file, line, expr);
    }
    return ok;
}

#define T_CHECK(cond, ...)                                                                         \
    do {                                                                                           \
        if (!t_check_(!!(cond), #cond, __FILE__, __LINE__)) {                                      \
            printf(__VA_ARGS__);                                                                   \
            printf("\n");                                                                          \
        }                                                                                          \
    } while (0)

#define T_ASSERT(cond, ...)                                                                        \
    do {                                                                                           \
        if (!t_check_(!!(cond), #cond, __FILE__, __LINE__)) {                                      \
            printf(__VA_ARGS__);                                                                   \
            printf("\n");                                                                          \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

static inline int t_done(void)
{
    printf("%d checks, %d failed\n", t_count, t_failed);
    return t_failed ? 1 : 0;
}

#endif
