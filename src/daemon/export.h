/*
 * Block nodes and their NBD exports inside cowtreed. A node owns one open image chain and a
 * mutex that serialises every engine call on it (the engine is single-threaded per handle);
 * holding the mutex also quiesces the disk for snapshots and pivots.
 */
#ifndef CT_DAEMON_EXPORT_H
#define CT_DAEMON_EXPORT_H

#include <pthread.h>
#include <stdbool.h>

#include "cowtree/cowtree.h"
#include "nbd/nbd-server.h"

struct node {
    char *name; /* node-name */
    char *file; /* current top image */
    char *format;
    struct ct_image *img;
    pthread_mutex_t lock;
    bool writable;
    struct nbd_export exp; /* exp.name = export name, NULL when not exported */
    char *export_id;       /* QMP block-export-add's id (defaults to the export name) */
    int users;             /* connections using the export */
    /* Called under `lock` after every successful guest write, zero write or trim (a mirror
     * job marks the range dirty); NULL when no job watches the node. */
    void (*write_hook)(void *opaque, uint64_t off, uint64_t len);
    void *write_hook_opaque;
    const char *busy_job; /* type of the block job working on the node, or NULL (under lock) */
    struct node *next;
};

/* Tell a watching job that [off, off+len) changed; caller holds n->lock. */
static inline void node_note_write(struct node *n, uint64_t off, uint64_t len)
{
    if (n->write_hook) {
        n->write_hook(n->write_hook_opaque, off, len);
    }
}

struct node_table {
    pthread_mutex_t lock;    /* protects the list and `users` */
    pthread_cond_t released; /* signalled when a connection lets go of an export */
    struct node *head;
};

extern struct node_table nodes;

int node_add(const char *name, const char *file, const char *format, bool writable,
             struct ct_err *err);
struct node *node_find(const char *name);
int node_export(struct node *n, const char *export_name, bool writable, struct ct_err *err);
/* block-export-del: stop exporting the node whose export has this id (no client connected). */
int node_unexport(const char *export_id, struct ct_err *err);
/* blockdev-del: flush, close and forget a node that is neither exported nor busy. */
int node_del(const char *name, struct ct_err *err);
/* Swap the node's image for another one (snapshot, pivot); caller holds n->lock. */
void node_set_image(struct node *n, struct ct_image *img, const char *file, const char *format);
void node_close_all(void);
/* Take a node's image out of the table (blockdev-mirror's target): the node must exist, be
 * writable, not exported and not busy. The node is gone afterwards; *img is the caller's. */
int node_take(const char *name, struct ct_image **img, struct ct_err *err);

extern const struct nbd_exports node_exports;

#endif
