// Linux calls for raw-relay (epoll, SO_REUSEPORT listeners, nonblocking sockets, CPU binding): Swift's Glibc
// module imports `struct epoll_event` (packed on x86-64) poorly, so the event loop's few calls live here.
#ifndef CRAWRELAY_H
#define CRAWRELAY_H
#include <stdint.h>
#include <stddef.h>

#define RR_IN 0x001u
#define RR_OUT 0x004u
#define RR_ERR 0x008u
#define RR_HUP 0x010u
#define RR_RDHUP 0x2000u

int rr_listen(const char *ip, int port);
int rr_accept(int listener);
int rr_connect(const char *ip, int port);
int rr_epoll_create(void);
int rr_epoll_ctl(int ep, int op, int fd, uint32_t events, uint64_t data);
int rr_epoll_wait(int ep, uint64_t *data, uint32_t *events, int max, int timeout);
long rr_recv(int fd, void *buf, size_t len);
long rr_send(int fd, const void *buf, size_t len);
int rr_wait_writable(int fd);
void rr_close(int fd);
int rr_bind_cpu(int cpu);
#endif
