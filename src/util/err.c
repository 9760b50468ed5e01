/* Error reporting helpers; see err.h. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "util/err.h"

int ct_err_set(struct ct_err *err, int code, const char *fmt, ...)
{
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
        va_end(ap);
        err->code = code;
    }
    return code;
}

void ct_err_prefix(struct ct_err *err, const char *fmt, ...)
{
    if (!err) {
        return;
    }
    char prefix[256], old[sizeof(err->msg)];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof(prefix), fmt, ap);
    va_end(ap);
    memcpy(old, err->msg, sizeof(old));
    size_t n = strlen(prefix);
    if (n >= sizeof(err->msg)) {
        n = sizeof(err->msg) - 1;
    }
    memcpy(err->msg, prefix, n);
    size_t m = strnlen(old, sizeof(old) - 1);
    if (m > sizeof(err->msg) - 1 - n) {
        m = sizeof(err->msg) - 1 - n;
    }
    memcpy(err->msg + n, old, m);
    err->msg[n + m] = '\0';
}

const char *ct_strerror(int code)
{
    if (code < 0) {
        code = -code;
    }
    switch (code) {
    case CT_E_CORRUPT:
        return "image is corrupt";
    case CT_E_UNSUPPORTED:
        return "not supported";
    case CT_E_STATE:
        return "image handle is in an error state";
    case CT_E_BUSY:
        return "image is in use";
    case CT_E_FORMAT:
        return "wrong image format";
    default:
        return strerror(code);
    }
}
