/*
 * Shared helpers for the libFuzzer targets (fuzz/fuzz-*.c).
 *
 * The public API opens images by path, so a target puts its bytes into an anonymous memory
 * file (memfd_create) and hands the engine "/proc/self/fd/N". Such files live in RAM, vanish
 * with their last descriptor, never collide between parallel fuzzing jobs, and the target can
 * read their current bytes at any moment (the "crash image" oracle of fuzz-write).
 */
#ifndef CT_FUZZ_COMMON_H
#define CT_FUZZ_COMMON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "cowtree/cowtree.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

/* A memory file holding a copy of data[0..len). Returns its fd (>= 0); path receives
 * "/proc/self/fd/N". Aborts if the kernel refuses (that is an environment problem). */
int fz_memfd(const void *data, size_t len, char *path, size_t path_len);
/* Current bytes of an fd (whole file). Returns 0, or -1 when larger than max. */
int fz_read_all(int fd, uint8_t **out, size_t *len, size_t max);
void fz_close_fd(int fd);

/* The real stderr while a target temporarily redirects the stdio stream (NULL: stderr). */
extern FILE *fz_stderr;

/* Report an oracle violation and abort (libFuzzer records the input). */
void fz_die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

/* Check-report collector: keeps the first lines, for failure messages. */
struct fz_report {
    char text[4096];
    size_t used;
    unsigned lines;
    /* "ERROR" lines, and among them OFLAG_COPIED findings in the harmless direction: the
     * flag is missing on a cluster whose refcount is 1 (writes then copy needlessly). Such
     * findings are a normal outcome of sharing between structures of different kinds (a data
     * cluster inside a compressed cluster's range) once one of the referrers goes away; QEMU
     * behaves the same. The opposite direction (COPIED on a shared cluster) is never benign. */
    unsigned errors, benign;
    unsigned copied; /* all "ERROR OFLAG_COPIED" findings */
};
void fz_report_cb(void *opaque, const char *line);

/* FUZZ_VERBOSE=1 in the environment: trace operations on stderr (for triage). */
extern bool fz_verbose;
void fz_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* FUZZ_AVOID=name,name,... in the environment: steer the input decoding away from known,
 * already reported bugs so that a long run finds new ones. Names are listed in the target
 * that uses them. Regression replays run without it. */
bool fz_avoid(const char *name);

#endif
