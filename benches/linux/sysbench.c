/* Per-call cost of Linux system calls (and of file reads and writes), timed by the program itself (CLOCK_MONOTONIC):
 * run in our guest (vmm run --exec) and on the host, the same binary. */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static long now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 1000;
    /* A process with some memory, as a clear_refs user has. */
    char *mem = mmap(0, 256 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(mem, 1, 256 * 4096);
    int pm = open("/proc/self/pagemap", O_RDONLY);
    int cr = open("/proc/self/clear_refs", O_WRONLY);
    uint64_t e;
    off_t off = (uintptr_t)mem / 4096 * 8;
    long t;

    t = now();
    for (long i = 0; i < n; i++) syscall(SYS_getpid);
    printf("getpid %ld\n", (now() - t) / n);

    t = now();
    for (long i = 0; i < n; i++)
        if (pread(pm, &e, 8, off) != 8) return 2;
    printf("pagemap-read-1 %ld\n", (now() - t) / n);

    uint64_t many[256];
    t = now();
    for (long i = 0; i < n; i++)
        if (pread(pm, many, sizeof many, off) != sizeof many) return 3;
    printf("pagemap-read-256 %ld\n", (now() - t) / n);

    t = now();
    for (long i = 0; i < n; i++)
        if (write(cr, "4", 1) != 1) return 4;
    printf("clear-refs-4 %ld\n", (now() - t) / n);

    t = now();
    for (long i = 0; i < n; i++) {
        void *p = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED || munmap(p, 4096) != 0) return 5;
    }
    printf("mmap-munmap %ld\n", (now() - t) / n);

    /* A file of the file system (the guest's is in guest RAM; the host's /tmp). */
    char path[64];
    snprintf(path, sizeof path, "/tmp/sysbench-%d", (int)getpid());
    int f = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    unlink(path);
    static char data[65536];
    t = now();
    for (long i = 0; i < n; i++)
        if (pwrite(f, data, 4096, 0) != 4096) return 6;
    printf("file-pwrite-4k %ld\n", (now() - t) / n);
    t = now();
    for (long i = 0; i < n; i++)
        if (pread(f, data, 4096, 0) != 4096) return 7;
    printf("file-pread-4k %ld\n", (now() - t) / n);
    t = now();
    for (long i = 0; i < n; i++)
        if (pwrite(f, data, sizeof data, 0) != sizeof data) return 8;
    printf("file-pwrite-64k %ld\n", (now() - t) / n);
    return 0;
}
