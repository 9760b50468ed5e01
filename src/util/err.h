/*
 * One error convention for the whole tree (docs/design.md, E1-E3):
 * control paths fill a caller-owned struct ct_err and return its code in one statement.
 */
#ifndef CT_UTIL_ERR_H
#define CT_UTIL_ERR_H

#include "cowtree/cowtree.h"

/* Set err (if non-NULL) to code and a formatted message; returns code (negative). */
int ct_err_set(struct ct_err *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Prepend context ("path: ") to an already-set message. */
void ct_err_prefix(struct ct_err *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
