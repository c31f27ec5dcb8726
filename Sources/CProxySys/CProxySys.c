#define _GNU_SOURCE
#include "CProxySys.h"

#include <string.h>

long cproxy_count_occurrences(const void *haystack, unsigned long length, const void *needle, unsigned long needle_length) {
    if (needle_length == 0) return 0;
    long count = 0;
    const char *cursor = haystack;
    const char *end = (const char *)haystack + length;
    while (cursor < end) {
        const char *found = memmem(cursor, (size_t)(end - cursor), needle, needle_length);
        if (found == NULL) break;
        count += 1;
        cursor = found + needle_length;
    }
    return count;
}

#if defined(__linux__)
#include <errno.h>
#include <sched.h>

int cproxy_allowed_cpus(int32_t *cpus, int32_t capacity) {
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof(set), &set) != 0) return -1;
    int32_t count = 0;
    for (int cpu = 0; cpu < CPU_SETSIZE && count < capacity; cpu++) {
        if (CPU_ISSET(cpu, &set)) cpus[count++] = cpu;
    }
    return count;
}

int cproxy_bind_current_thread(int32_t cpu) {
    if (cpu < 0 || cpu >= CPU_SETSIZE) {
        errno = EINVAL;
        return -1;
    }
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return sched_setaffinity(0, sizeof(set), &set);
}

#include <sys/prctl.h>
#include <sys/resource.h>

int cproxy_open_files_limit(uint64_t raise_to, uint64_t *soft, uint64_t *hard) {
    struct rlimit limit;
    if (getrlimit(RLIMIT_NOFILE, &limit) != 0) return -1;
    if (raise_to > limit.rlim_cur) {
        struct rlimit raised = limit;
        raised.rlim_cur = (limit.rlim_max == RLIM_INFINITY || raise_to < limit.rlim_max) ? raise_to : limit.rlim_max;
        if (raised.rlim_cur > limit.rlim_cur && setrlimit(RLIMIT_NOFILE, &raised) == 0) limit = raised;
    }
    *soft = limit.rlim_cur;
    *hard = limit.rlim_max;
    return 0;
}

void cproxy_name_current_thread(const char *name) {
    char cut[16];
    strncpy(cut, name, sizeof(cut) - 1);
    cut[sizeof(cut) - 1] = 0;
    (void)prctl(PR_SET_NAME, (unsigned long)cut, 0, 0, 0);
}

#include <fcntl.h>
#include <linux/inet_diag.h>
#include <linux/netlink.h>
#include <linux/sock_diag.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <sys/socket.h>
#include <unistd.h>

int cproxy_epoll_create(void) { return epoll_create1(EPOLL_CLOEXEC); }

int cproxy_epoll_ctl(int epfd, int op, int fd, uint32_t events, uint64_t data) {
    struct epoll_event event;
    memset(&event, 0, sizeof(event));
    event.events = events;
    event.data.u64 = data;
    return epoll_ctl(epfd, op, fd, &event);
}

int cproxy_epoll_wait(int epfd, uint32_t *events, uint64_t *data, int capacity, int timeout_ms) {
    struct epoll_event ready[256];
    if (capacity > 256) capacity = 256;
    int count = epoll_wait(epfd, ready, capacity, timeout_ms);
    for (int i = 0; i < count; i++) {
        events[i] = ready[i].events;
        data[i] = ready[i].data.u64;
    }
    return count;
}

int cproxy_eventfd(void) { return eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC); }

void cproxy_eventfd_signal(int fd) {
    uint64_t one = 1;
    ssize_t ignored = write(fd, &one, sizeof(one));
    (void)ignored;
}

void cproxy_eventfd_drain(int fd) {
    uint64_t value;
    ssize_t ignored = read(fd, &value, sizeof(value));
    (void)ignored;
}

int cproxy_timerfd(void) { return timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC); }

int cproxy_timerfd_every(int fd, uint64_t interval_ns) {
    struct itimerspec spec;
    memset(&spec, 0, sizeof(spec));
    spec.it_interval.tv_sec = (time_t)(interval_ns / 1000000000u);
    spec.it_interval.tv_nsec = (long)(interval_ns % 1000000000u);
    spec.it_value = spec.it_interval;
    return timerfd_settime(fd, 0, &spec, NULL);
}

static int same_address(const struct sockaddr_storage *a, const void *b, uint32_t b_len) {
    const struct sockaddr *other = (const struct sockaddr *)b;
    if (b_len < sizeof(sa_family_t) || a->ss_family != other->sa_family) return 0;
    if (a->ss_family == AF_INET && b_len >= sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *x = (const struct sockaddr_in *)a, *y = (const struct sockaddr_in *)b;
        return x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
    }
    if (a->ss_family == AF_INET6 && b_len >= sizeof(struct sockaddr_in6)) {
        const struct sockaddr_in6 *x = (const struct sockaddr_in6 *)a, *y = (const struct sockaddr_in6 *)b;
        return x->sin6_port == y->sin6_port && memcmp(&x->sin6_addr, &y->sin6_addr, sizeof(x->sin6_addr)) == 0;
    }
    return 0;
}

int cproxy_socket_is(int fd, const void *local, uint32_t local_len, const void *remote, uint32_t remote_len) {
    int type = 0;
    socklen_t type_len = sizeof(type);
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &type_len) != 0 || type != SOCK_STREAM) return 0;
    struct sockaddr_storage address;
    socklen_t length = sizeof(address);
    if (getsockname(fd, (struct sockaddr *)&address, &length) != 0 || !same_address(&address, local, local_len)) return 0;
    length = sizeof(address);
    if (getpeername(fd, (struct sockaddr *)&address, &length) != 0 || !same_address(&address, remote, remote_len)) return 0;
    return 1;
}

int cproxy_is_listening_on(int fd, const void *local, uint32_t local_len) {
    int value = 0;
    socklen_t value_len = sizeof(value);
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &value, &value_len) != 0 || value != SOCK_STREAM) return 0;
    value_len = sizeof(value);
    if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &value, &value_len) != 0 || value != 1) return 0;
    struct sockaddr_storage address;
    socklen_t length = sizeof(address);
    if (getsockname(fd, (struct sockaddr *)&address, &length) != 0 || !same_address(&address, local, local_len)) return 0;
    return 1;
}

int cproxy_shed_waiting(int fd, int *stopped_by) {
    int closed = 0;
    for (;;) {
        int accepted = accept4(fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
        if (accepted < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            *stopped_by = errno;
            return closed;
        }
        close(accepted);
        closed += 1;
    }
}

int cproxy_dup(int fd) { return fcntl(fd, F_DUPFD_CLOEXEC, 0); }

int cproxy_close(int fd) { return close(fd); }

long cproxy_send(int fd, const void *bytes, unsigned long count) { return send(fd, bytes, count, MSG_NOSIGNAL); }

long cproxy_send_nowait(int fd, const void *bytes, unsigned long count) {
    for (;;) {
        ssize_t written = send(fd, bytes, count, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (written >= 0) return (long)written;
        if (errno != EINTR) return -(long)errno;
    }
}

int cproxy_count_listeners(const void *address, uint32_t length) {
    const struct sockaddr *sa = address;
    uint8_t want[16];
    size_t want_len;
    uint16_t want_port;  /* network order, as inet_diag reports it */
    if (sa->sa_family == AF_INET && length >= sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *in = address;
        memcpy(want, &in->sin_addr, 4);
        want_len = 4;
        want_port = in->sin_port;
    } else if (sa->sa_family == AF_INET6 && length >= sizeof(struct sockaddr_in6)) {
        const struct sockaddr_in6 *in6 = address;
        memcpy(want, &in6->sin6_addr, 16);
        want_len = 16;
        want_port = in6->sin6_port;
    } else {
        return -EAFNOSUPPORT;
    }
    int fd = socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
    if (fd < 0) return -errno;
    struct {
        struct nlmsghdr header;
        struct inet_diag_req_v2 request;
    } message;
    memset(&message, 0, sizeof(message));
    message.header.nlmsg_len = sizeof(message);
    message.header.nlmsg_type = SOCK_DIAG_BY_FAMILY;
    message.header.nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP;
    message.request.sdiag_family = sa->sa_family;
    message.request.sdiag_protocol = IPPROTO_TCP;
    message.request.idiag_states = 1u << TCP_LISTEN;
    struct sockaddr_nl kernel;
    memset(&kernel, 0, sizeof(kernel));
    kernel.nl_family = AF_NETLINK;
    if (sendto(fd, &message, sizeof(message), 0, (struct sockaddr *)&kernel, sizeof(kernel)) < 0) {
        int error = errno;
        close(fd);
        return -error;
    }
    int count = 0;
    long buffer[8192 / sizeof(long)];
    for (;;) {
        ssize_t received = recv(fd, buffer, sizeof(buffer), 0);
        if (received < 0) {
            if (errno == EINTR) continue;
            int error = errno;
            close(fd);
            return -error;
        }
        if (received == 0) break;
        struct nlmsghdr *header = (struct nlmsghdr *)buffer;
        for (; NLMSG_OK(header, (unsigned int)received); header = NLMSG_NEXT(header, received)) {
            if (header->nlmsg_type == NLMSG_DONE) {
                close(fd);
                return count;
            }
            if (header->nlmsg_type == NLMSG_ERROR) {
                struct nlmsgerr *failure = NLMSG_DATA(header);
                close(fd);
                return failure->error < 0 ? failure->error : -EIO;
            }
            if (header->nlmsg_type != SOCK_DIAG_BY_FAMILY) continue;
            struct inet_diag_msg *socket_info = NLMSG_DATA(header);
            if (socket_info->id.idiag_sport == want_port && memcmp(socket_info->id.idiag_src, want, want_len) == 0) {
                count += 1;
            }
        }
    }
    close(fd);
    return count;
}

#else
#include <errno.h>
int cproxy_epoll_create(void) { errno = ENOSYS; return -1; }
int cproxy_epoll_ctl(int epfd, int op, int fd, uint32_t events, uint64_t data) { errno = ENOSYS; return -1; }
int cproxy_epoll_wait(int epfd, uint32_t *events, uint64_t *data, int capacity, int timeout_ms) { errno = ENOSYS; return -1; }
int cproxy_eventfd(void) { errno = ENOSYS; return -1; }
void cproxy_eventfd_signal(int fd) { (void)fd; }
void cproxy_eventfd_drain(int fd) { (void)fd; }
int cproxy_timerfd(void) { errno = ENOSYS; return -1; }
int cproxy_timerfd_every(int fd, uint64_t interval_ns) { (void)fd; (void)interval_ns; errno = ENOSYS; return -1; }
int cproxy_socket_is(int fd, const void *local, uint32_t local_len, const void *remote, uint32_t remote_len) { return 0; }
int cproxy_is_listening_on(int fd, const void *local, uint32_t local_len) { return 0; }
int cproxy_shed_waiting(int fd, int *stopped_by) { (void)fd; *stopped_by = ENOSYS; return 0; }
int cproxy_dup(int fd) { errno = ENOSYS; return -1; }
int cproxy_close(int fd) { errno = ENOSYS; return -1; }
long cproxy_send(int fd, const void *bytes, unsigned long count) { errno = ENOSYS; return -1; }
long cproxy_send_nowait(int fd, const void *bytes, unsigned long count) { return -ENOSYS; }
int cproxy_allowed_cpus(int32_t *cpus, int32_t capacity) { (void)cpus; (void)capacity; return -1; }
int cproxy_bind_current_thread(int32_t cpu) { (void)cpu; errno = ENOSYS; return -1; }
void cproxy_name_current_thread(const char *name) { (void)name; }
int cproxy_open_files_limit(uint64_t raise_to, uint64_t *soft, uint64_t *hard) { errno = ENOSYS; return -1; }
int cproxy_count_listeners(const void *address, uint32_t length) { (void)address; (void)length; return -ENOSYS; }

#endif
