#ifndef CPROXY_SYS_H
#define CPROXY_SYS_H

/* Linux calls Swift's Glibc module does not import (they need _GNU_SOURCE), for ProxyCore's CPUPinning. */

#include <stdint.h>

/* Writes up to `capacity` CPU numbers the calling thread may run on into `cpus`, ascending; returns how many, or -1. */
int cproxy_allowed_cpus(int32_t *cpus, int32_t capacity);

/* Binds the calling thread to one CPU; 0 on success, -1 (errno set) when the kernel refuses. */
int cproxy_bind_current_thread(int32_t cpu);

#endif
