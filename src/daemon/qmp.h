/* QMP (the QEMU Machine Protocol) over a unix socket: greeting, capabilities negotiation,
 * commands with arguments, return/error replies and events. */
#ifndef CT_DAEMON_QMP_H
#define CT_DAEMON_QMP_H

/* Serve one QMP client on fd until it disconnects or sends quit (then *quit is set). */
void qmp_serve(int fd, int *quit);
/* Queue an event for every connected QMP client. data may be NULL. */
struct json_object;
void qmp_event(const char *name, struct json_object *data);

#endif
