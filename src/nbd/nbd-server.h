/*
 * NBD server protocol engine: negotiation and transmission for one connection, over an
 * export vtable. It knows nothing of qcow2 or images: the daemon supplies the exports.
 */
#ifndef CT_NBD_SERVER_H
#define CT_NBD_SERVER_H

#include <stdbool.h>
#include <stdint.h>

struct nbd_extent {
    uint64_t len;
    uint32_t flags; /* base:allocation NBD_STATE_* or, for allocation depth, the depth */
};

/* One export's operations; every function returns 0 or -errno and may be called from several
 * threads at once (several connections, and the workers of one connection, see `threads`
 * below): the implementation serialises as needed. */
struct nbd_export_ops {
    uint64_t (*size)(void *opaque);
    int (*pread)(void *opaque, void *buf, uint32_t len, uint64_t off);
    int (*pwrite)(void *opaque, const void *buf, uint32_t len, uint64_t off, bool fua);
    int (*flush)(void *opaque);
    int (*trim)(void *opaque, uint32_t len, uint64_t off, bool fua);
    int (*zero)(void *opaque, uint32_t len, uint64_t off, bool may_trim, bool fua);
    /* Status of the longest run starting at off (at most len): base:allocation. */
    int (*block_status)(void *opaque, uint64_t off, uint64_t len, struct nbd_extent *out);
    /* qemu:allocation-depth: 0 unallocated in the chain, N = provided by layer N (1 = top). */
    int (*alloc_depth)(void *opaque, uint64_t off, uint64_t len, struct nbd_extent *out);
};

struct nbd_export {
    const char *name;
    const char *description;
    bool writable;
    bool multi_conn; /* flushes are consistent across connections */
    const struct nbd_export_ops *ops;
    void *opaque;
};

/* Export lookup: returns a borrowed export, or NULL if none has that name. The returned
 * export must stay valid until nbd_release is called with it. */
struct nbd_exports {
    struct nbd_export *(*find)(void *opaque, const char *name);
    void (*release)(void *opaque, struct nbd_export *exp);
    /* Calls fn for every export (NBD_OPT_LIST). */
    void (*list)(void *opaque, void (*fn)(void *arg, const struct nbd_export *exp), void *arg);
    void *opaque;
    /* Requests of one connection executed at once, each on its own thread (at most
     * NBD_MAX_THREADS); replies then leave in completion order. 0 or 1: one request at a
     * time, answered in the order received. */
    unsigned threads;
};

#define NBD_MAX_THREADS 64

/* Serve one client on fd until it disconnects; closes nothing (after a protocol or socket
 * error the socket is shut down). Returns once no request of the client is executing any
 * more: 0 on a clean disconnect, -errno on a protocol or I/O failure. */
int nbd_serve(int fd, const struct nbd_exports *exports);

#endif
