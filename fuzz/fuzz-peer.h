/*
 * A fake client for the protocol fuzzers (fuzz-nbd, fuzz-qmp): the server under test runs in
 * the calling thread on one end of a socketpair while a helper thread plays the client on the
 * other end: it sends the whole input, shuts down its write side (the server sees EOF), and
 * reads everything the server sends until the server's end is closed. Reading and writing are
 * interleaved with poll(), so a server that blocks writing replies never deadlocks the run.
 */
#ifndef CT_FUZZ_PEER_H
#define CT_FUZZ_PEER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct fz_peer_out {
    uint8_t *buf;   /* what the server sent, at most max_keep bytes (borrowed: valid until
                     * the next fz_peer_run) */
    size_t len;     /* bytes kept */
    size_t total;   /* bytes received */
    size_t written; /* input bytes the server accepted before closing */
};

/* Run serve(fd, opaque) against the input; returns when serve has returned and the helper has
 * seen the server's end close. Aborts on environment failures (socketpair, threads). */
void fz_peer_run(const uint8_t *in, size_t in_len, void (*serve)(int fd, void *opaque),
                 void *opaque, size_t max_keep, struct fz_peer_out *out);

/*
 * A private working directory for targets whose commands create and open files by name
 * (fuzz-qmp, fuzz-xml): made under /dev/shm (else $TMPDIR or /tmp), entered with chdir, and
 * removed at exit. The targets keep '/' out of every file name the server sees, so nothing
 * outside it is touched. Call it from LLVMFuzzerInitialize with its argc/argv: libFuzzer reads
 * its arguments after that call, so the relative paths among them (inputs, corpus directories,
 * -artifact_prefix, -dict, ...) are made absolute first, and crash files go to the starting
 * directory as usual. libFuzzer refuses a changed argv[0]: for -fork and -minimize_crash
 * (which run the program again, from the private directory) start it by an absolute path.
 * Returns the directory's absolute path (static storage).
 */
const char *fz_private_dir(const char *tag, int *argc, char ***argv);
/* Remove every entry of the current directory except the names in keep (NULL-terminated). */
void fz_clear_dir(const char *const *keep);
/* Write a whole file (created or truncated); aborts on failure. */
void fz_write_file(const char *name, const void *data, size_t len);
/* Read a whole file; returns a malloc'ed buffer, aborts on failure. */
uint8_t *fz_slurp(const char *name, size_t *len);

#endif
