#define _GNU_SOURCE
#include "CProxySys.h"

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
#else
#include <errno.h>
int cproxy_allowed_cpus(int32_t *cpus, int32_t capacity) { (void)cpus; (void)capacity; return -1; }
int cproxy_bind_current_thread(int32_t cpu) { (void)cpu; errno = ENOSYS; return -1; }
#endif
