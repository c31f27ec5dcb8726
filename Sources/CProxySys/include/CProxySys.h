#ifndef CPROXY_SYS_H
#define CPROXY_SYS_H

/* Linux calls Swift's Glibc module does not import (they need _GNU_SOURCE), for ProxyCore's CPUPinning, and the
 * thin epoll/eventfd/socket wrappers of its tunnel relay (TunnelRelay.swift): `struct epoll_event` is packed on
 * x86_64, so events cross into Swift as two plain arrays. */

#include <stdint.h>

/* Writes up to `capacity` CPU numbers the calling thread may run on into `cpus`, ascending; returns how many, or -1. */
int cproxy_allowed_cpus(int32_t *cpus, int32_t capacity);

/* Binds the calling thread to one CPU; 0 on success, -1 (errno set) when the kernel refuses. */
int cproxy_bind_current_thread(int32_t cpu);

/* The open-file limit (RLIMIT_NOFILE): reads the soft and hard limits, and with `raise_to` > soft, raises the soft
 * limit to min(raise_to, hard) first. 0, or -1 (errno set) when the kernel refuses. */
int cproxy_open_files_limit(uint64_t raise_to, uint64_t *soft, uint64_t *hard);

/* Names the calling thread as the kernel shows it (top -H, perf, /proc/PID/task/TID/comm): at most 15 bytes, longer
 * names are cut. */
void cproxy_name_current_thread(const char *name);

/* epoll, level-triggered. The event bits, so Swift need not import the kernel's enum. */
#define CPROXY_EV_IN 0x001u
#define CPROXY_EV_OUT 0x004u
#define CPROXY_EV_ERR 0x008u
#define CPROXY_EV_HUP 0x010u
#define CPROXY_EV_RDHUP 0x2000u

/* epoll_create1(EPOLL_CLOEXEC); -1 with errno on failure (ENOSYS off Linux). */
int cproxy_epoll_create(void);
/* op: 1 add, 2 delete, 3 modify (EPOLL_CTL_*). */
int cproxy_epoll_ctl(int epfd, int op, int fd, uint32_t events, uint64_t data);
/* Fills events[i] and data[i] for up to `capacity` ready descriptors; returns how many, or -1 (errno). */
int cproxy_epoll_wait(int epfd, uint32_t *events, uint64_t *data, int capacity, int timeout_ms);

/* A non-blocking, close-on-exec eventfd; -1 on failure. */
int cproxy_eventfd(void);
/* Adds one to the eventfd (wakes its epoll), or reads it back to zero. */
void cproxy_eventfd_signal(int fd);
void cproxy_eventfd_drain(int fd);

/* EPOLLONESHOT: the descriptor is reported once, then not again until modified (op 3) with it again. */
#define CPROXY_EV_ONESHOT 0x40000000u

/* A non-blocking, close-on-exec timerfd on CLOCK_MONOTONIC; -1 on failure. */
int cproxy_timerfd(void);
/* Fires every `interval_ns` from now on (0 disarms it); -1 with errno on failure. Read it back with
 * cproxy_eventfd_drain (both hold an 8-byte count). */
int cproxy_timerfd_every(int fd, uint64_t interval_ns);

/* 1 when `fd` is a connected TCP socket whose local and peer addresses equal `local` and `remote` (family, address
 * and port); 0 otherwise. */
int cproxy_socket_is(int fd, const void *local, uint32_t local_len, const void *remote, uint32_t remote_len);

/* 1 when `fd` is a listening TCP socket bound to `local` (family, address and port); 0 otherwise. */
int cproxy_is_listening_on(int fd, const void *local, uint32_t local_len);

/* Takes the connections waiting on the (non-blocking) listening socket `fd` off its queue and closes each at once,
 * until none is left (`*stopped_by` = EAGAIN) or accept(2) fails otherwise (`*stopped_by` = its errno: out of
 * descriptors still, say); returns how many it closed. For a listener that cannot accept for want of descriptors:
 * the caller frees one first (`ListenerShedding`). */
int cproxy_shed_waiting(int fd, int *stopped_by);

/* close(2), named apart from the Swift methods called close. */
int cproxy_close(int fd);

/* fcntl(fd, F_DUPFD_CLOEXEC, 0). */
int cproxy_dup(int fd);

/* send(2) with MSG_NOSIGNAL: a peer that went away gives EPIPE, not SIGPIPE. */
long cproxy_send(int fd, const void *bytes, unsigned long count);

/* send(2) with MSG_NOSIGNAL | MSG_DONTWAIT, retried on EINTR: the bytes written, or -errno (-EAGAIN when the socket
 * buffer is full). */
long cproxy_send_nowait(int fd, const void *bytes, unsigned long count);

/* Sends to many sockets in one system call (SendBatch.c: an io_uring used only for IORING_OP_SEND). Each send is
 * send(2) with MSG_NOSIGNAL | MSG_DONTWAIT: it writes what the socket takes now and never waits. One batch belongs to
 * one thread.
 *
 * create: a batch of up to `entries` sends (rounded up to a power of two), or NULL with errno set when the kernel has
 * no io_uring or refuses it (seccomp, io_uring_disabled): then send each with cproxy_send_nowait. */
typedef struct cproxy_send_batch cproxy_send_batch;
cproxy_send_batch *cproxy_send_batch_create(unsigned entries);
void cproxy_send_batch_destroy(cproxy_send_batch *batch);
/* How many sends one run takes at most. */
unsigned cproxy_send_batch_capacity(const cproxy_send_batch *batch);
/* Sends `lengths[i]` bytes from `bytes[i]` to `fds[i]` for i < count (count <= capacity); `results[i]` gets the bytes
 * written or -errno (-EAGAIN: the socket's buffer is full), as cproxy_send_nowait would return. 0 when every send ran;
 * -1 (errno set) when the ring failed: then `results[i]` is -ECANCELED for sends never made (send them another way)
 * and -EINPROGRESS for sends whose outcome is unknown (the stream cannot go on). */
int cproxy_send_batch_run(cproxy_send_batch *batch, unsigned count, const int32_t *fds, const void *const *bytes,
                          const uint32_t *lengths, long *results);

/* How many TCP sockets listen on exactly `address` (a sockaddr_in or sockaddr_in6: family, address and port), asked
 * of the kernel with NETLINK_SOCK_DIAG for listening sockets only (so it costs the same however many connections
 * exist); -errno when the kernel cannot be asked. */
int cproxy_count_listeners(const void *address, uint32_t length);

/* How many times `needle` occurs in `haystack`, not overlapping (memmem). */
long cproxy_count_occurrences(const void *haystack, unsigned long length, const void *needle, unsigned long needle_length);

#endif
