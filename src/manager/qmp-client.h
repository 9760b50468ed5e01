/*
 * A small QMP client (the QEMU Machine Protocol, as cowtreed and qemu-storage-daemon speak
 * it) for the snapshot manager: connect to a unix socket, read the greeting, negotiate
 * capabilities, execute commands with an id and keep the events that arrive meanwhile.
 *
 * Library code: nothing prints. Failures return a negative code with a message in err:
 *   -ECONNREFUSED / -ENOENT  nobody listens on the socket
 *   -ETIMEDOUT               no reply (or no awaited event) within the timeout
 *   -EPIPE                   the peer closed the connection
 *   -ENOTSUP                 QMP error class CommandNotFound
 *   -ENODEV                  QMP error class DeviceNotFound
 *   -EIO                     any other QMP error (GenericError): err->msg is its desc
 * The class of the last QMP error is kept (qmp_last_class).
 *
 * Lifetimes: json objects returned through out pointers are owned by the caller
 * (json_object_put). Arguments passed to qmp_execute are taken over (put) by the call.
 */
#ifndef CT_MANAGER_QMP_CLIENT_H
#define CT_MANAGER_QMP_CLIENT_H

#include <json-c/json.h>
#include <stdbool.h>

#include "cowtree/cowtree.h"

struct qmp;

/* Connect to path, read the greeting and send qmp_capabilities. */
int qmp_connect(struct qmp **out, const char *path, int timeout_ms, struct ct_err *err);
void qmp_close(struct qmp *q);
/* Default reply timeout for qmp_execute (milliseconds; 0 = wait forever). */
void qmp_set_timeout(struct qmp *q, int timeout_ms);

/* Run cmd with args (may be NULL; taken over). *ret (optional) receives the "return" value. */
int qmp_execute(struct qmp *q, const char *cmd, json_object *args, json_object **ret,
                struct ct_err *err);
const char *qmp_last_class(const struct qmp *q);

/* Wait for the next event whose name is one of names (NULL-terminated; NULL = any) and,
 * when device is not NULL, whose data.device or data.id equals it. Events queued earlier are
 * looked at first; non-matching ones stay queued. timeout_ms < 0 waits forever. */
int qmp_wait_event(struct qmp *q, const char *const *names, const char *device, int timeout_ms,
                   json_object **ev, struct ct_err *err);
/* Drop queued events. */
void qmp_drop_events(struct qmp *q);

/* Helpers for building and reading json. */
const char *qmp_str(json_object *o, const char *key);
int64_t qmp_int(json_object *o, const char *key, int64_t def);
bool qmp_bool(json_object *o, const char *key, bool def);

#endif
