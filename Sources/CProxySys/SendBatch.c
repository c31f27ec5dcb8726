#define _GNU_SOURCE
#include "CProxySys.h"

/* Many sends, each to its own socket, in one system call: a minimal io_uring submission ring used only for
 * IORING_OP_SEND with MSG_DONTWAIT (see CProxySys.h). No liburing: the ring is set up and driven by hand, which is
 * the part of io_uring's ABI this needs (setup, one mmap, enter). */

#if defined(__linux__)
#include <errno.h>
#include <linux/io_uring.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

struct cproxy_send_batch {
    int fd;
    unsigned entries;
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array;
    unsigned *cq_head, *cq_tail, *cq_mask;
    struct io_uring_cqe *cqes;
    struct io_uring_sqe *sqes;
    void *ring;
    size_t ring_length;
    size_t sqes_length;
};

static int uring_setup(unsigned entries, struct io_uring_params *params, unsigned flags) {
    memset(params, 0, sizeof(*params));
    params->flags = flags;
    return (int)syscall(__NR_io_uring_setup, entries, params);
}

cproxy_send_batch *cproxy_send_batch_create(unsigned entries) {
    struct io_uring_params params;
    /* SUBMIT_ALL: one bad entry does not stop the others; COOP_TASKRUN: no interrupts for completions. Not
     * SINGLE_ISSUER: a ring belongs to an HTTP relay shard, and whichever relay thread runs the shard submits (one at
     * a time). Older kernels refuse those flags: then the plain ring. */
    int fd = uring_setup(entries, &params, IORING_SETUP_SUBMIT_ALL | IORING_SETUP_COOP_TASKRUN);
    if (fd < 0 && errno == EINVAL) fd = uring_setup(entries, &params, 0);
    if (fd < 0) return NULL;
    if (!(params.features & IORING_FEAT_SINGLE_MMAP) || !(params.features & IORING_FEAT_NODROP)) {
        close(fd);
        errno = ENOTSUP;
        return NULL;
    }
    size_t sq_length = params.sq_off.array + params.sq_entries * sizeof(unsigned);
    size_t cq_length = params.cq_off.cqes + params.cq_entries * sizeof(struct io_uring_cqe);
    size_t ring_length = sq_length > cq_length ? sq_length : cq_length;
    void *ring = mmap(NULL, ring_length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQ_RING);
    if (ring == MAP_FAILED) {
        int saved = errno;
        close(fd);
        errno = saved;
        return NULL;
    }
    size_t sqes_length = params.sq_entries * sizeof(struct io_uring_sqe);
    void *sqes = mmap(NULL, sqes_length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQES);
    if (sqes == MAP_FAILED) {
        int saved = errno;
        munmap(ring, ring_length);
        close(fd);
        errno = saved;
        return NULL;
    }
    cproxy_send_batch *batch = calloc(1, sizeof(*batch));
    if (batch == NULL) {
        munmap(sqes, sqes_length);
        munmap(ring, ring_length);
        close(fd);
        errno = ENOMEM;
        return NULL;
    }
    char *base = ring;
    batch->fd = fd;
    batch->entries = params.sq_entries;
    batch->sq_head = (unsigned *)(base + params.sq_off.head);
    batch->sq_tail = (unsigned *)(base + params.sq_off.tail);
    batch->sq_mask = (unsigned *)(base + params.sq_off.ring_mask);
    batch->sq_array = (unsigned *)(base + params.sq_off.array);
    batch->cq_head = (unsigned *)(base + params.cq_off.head);
    batch->cq_tail = (unsigned *)(base + params.cq_off.tail);
    batch->cq_mask = (unsigned *)(base + params.cq_off.ring_mask);
    batch->cqes = (struct io_uring_cqe *)(base + params.cq_off.cqes);
    batch->sqes = sqes;
    batch->ring = ring;
    batch->ring_length = ring_length;
    batch->sqes_length = sqes_length;
    return batch;
}

void cproxy_send_batch_destroy(cproxy_send_batch *batch) {
    if (batch == NULL) return;
    munmap(batch->sqes, batch->sqes_length);
    munmap(batch->ring, batch->ring_length);
    close(batch->fd);
    free(batch);
}

unsigned cproxy_send_batch_capacity(const cproxy_send_batch *batch) { return batch->entries; }

/* Reaps every completion there is into `results` (by user_data); how many. */
static unsigned reap(cproxy_send_batch *batch, long *results, unsigned count) {
    unsigned head = *batch->cq_head;
    unsigned tail = __atomic_load_n(batch->cq_tail, __ATOMIC_ACQUIRE);
    unsigned reaped = 0;
    while (head != tail) {
        struct io_uring_cqe *cqe = &batch->cqes[head & *batch->cq_mask];
        if (cqe->user_data < count) results[cqe->user_data] = cqe->res;
        head++;
        reaped++;
    }
    __atomic_store_n(batch->cq_head, head, __ATOMIC_RELEASE);
    return reaped;
}

int cproxy_send_batch_run(cproxy_send_batch *batch, unsigned count, const int32_t *fds, const void *const *bytes,
                          const uint32_t *lengths, long *results) {
    if (count == 0) return 0;
    if (count > batch->entries) {
        for (unsigned i = 0; i < count; i++) results[i] = -ECANCELED;  /* none sent: the caller sends them itself */
        errno = EINVAL;
        return -1;
    }
    unsigned tail = *batch->sq_tail;
    unsigned mask = *batch->sq_mask;
    for (unsigned i = 0; i < count; i++) {
        unsigned index = (tail + i) & mask;
        struct io_uring_sqe *sqe = &batch->sqes[index];
        memset(sqe, 0, sizeof(*sqe));
        sqe->opcode = IORING_OP_SEND;
        sqe->fd = fds[i];
        sqe->addr = (uint64_t)(uintptr_t)bytes[i];
        sqe->len = lengths[i];
        /* DONTWAIT: a full socket answers -EAGAIN at once, as send(2) would; the ring never waits on it. */
        sqe->msg_flags = MSG_NOSIGNAL | MSG_DONTWAIT;
        sqe->user_data = i;
        batch->sq_array[index] = index;
        results[i] = -EINPROGRESS;
    }
    __atomic_store_n(batch->sq_tail, tail + count, __ATOMIC_RELEASE);
    unsigned completed = 0;
    int retries = 0;
    while (completed < count) {
        unsigned consumed = __atomic_load_n(batch->sq_head, __ATOMIC_ACQUIRE) - tail;
        long entered = syscall(__NR_io_uring_enter, batch->fd, count - consumed, count - completed,
                               IORING_ENTER_GETEVENTS, NULL, 0);
        completed += reap(batch, results, count);
        if (entered >= 0) continue;
        /* Interrupted, or short of memory for a moment: again (boundedly). */
        if (errno == EINTR || ((errno == EAGAIN || errno == EBUSY) && ++retries < 1000)) continue;
        int saved = errno;
        /* The entries the kernel did not take are taken back: the caller sends those itself. Taken ones that have not
         * completed keep -EINPROGRESS: what they sent is unknown. */
        unsigned head = __atomic_load_n(batch->sq_head, __ATOMIC_ACQUIRE);
        for (unsigned i = head - tail; i < count; i++) results[i] = -ECANCELED;
        __atomic_store_n(batch->sq_tail, head, __ATOMIC_RELEASE);
        errno = saved;
        return -1;
    }
    return 0;
}

#else
#include <errno.h>
#include <stddef.h>
cproxy_send_batch *cproxy_send_batch_create(unsigned entries) { (void)entries; errno = ENOSYS; return NULL; }
void cproxy_send_batch_destroy(cproxy_send_batch *batch) { (void)batch; }
unsigned cproxy_send_batch_capacity(const cproxy_send_batch *batch) { (void)batch; return 0; }
int cproxy_send_batch_run(cproxy_send_batch *batch, unsigned count, const int32_t *fds, const void *const *bytes,
                          const uint32_t *lengths, long *results) { errno = ENOSYS; return -1; }
#endif
