/* QMP (the QEMU Machine Protocol) over a unix socket: greeting, capabilities negotiation,
 * commands with arguments, return/error replies and events. */
#ifndef CT_DAEMON_QMP_H
#define CT_DAEMON_QMP_H

#include <stdbool.h>

struct json_object;
struct node;

/* A command's reply: ret on success, or an error class (QEMU's: GenericError,
 * CommandNotFound, DeviceNotFound) and its description. */
struct qmp_reply {
    struct json_object *ret;
    const char *klass;
    char desc[1024];
};
/* Set the error; returns -1 (for `return qmp_fail(...)`). */
int qmp_fail(struct qmp_reply *r, const char *klass, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Argument lookups: a string member (NULL if absent or not a string), a boolean with default,
 * and the node named by `node-name` or `device` (NULL with a DeviceNotFound error). */
const char *qmp_arg_str(struct json_object *args, const char *key);
bool qmp_arg_bool(struct json_object *args, const char *key, bool def);
struct node *qmp_arg_node(struct json_object *args, struct qmp_reply *r);

/* The block job commands (blockjob.c); false when cmd is not one of them. */
bool blockjob_dispatch(const char *cmd, struct json_object *args, struct qmp_reply *r);
/* Cancel every job and wait for them (daemon shutdown, before the nodes close). */
void blockjob_cancel_all(void);

/* Serve one QMP client on fd until it disconnects or sends quit (then *quit is set). */
void qmp_serve(int fd, int *quit);
/* Queue an event for every connected QMP client. data may be NULL (ownership taken). */
void qmp_event(const char *name, struct json_object *data);

#endif
