/* Memory calls of a Linux program in our guest, against a Linux host's: madvise
 * (MADV_DONTNEED and MADV_FREE drop private anonymous pages, which read zero again;
 * a shared or file mapping keeps its bytes in the file), pagemap's present bits,
 * smaps of a large reservation, and /proc/self/status. tests/linux_exec.rs compares every line with the host's. */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#define PAGE 4096
static int present(int pagemap, void *p) {
    uint64_t e = 0;
    pread(pagemap, &e, 8, (uintptr_t)p / PAGE * 8);
    return (int)(e >> 63);
}
/* Each page's present bit, then its byte (which a read faults in). */
static void row(const char *what, int pagemap, char *p, int pages) {
    printf("%s:", what);
    for (int i = 0; i < pages; i++) {
        int was = present(pagemap, p + i * PAGE);
        printf(" %d/%d", was, p[i * PAGE + 5]);
    }
    printf("\n");
}
static void say(const char *what, long r) { printf("%s=%ld errno=%d\n", what, r, r < 0 ? errno : 0); errno = 0; }
int main(void) {
    int pm = open("/proc/self/pagemap", O_RDONLY);
    char *p = mmap(NULL, 5 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    munmap(p + 4 * PAGE, PAGE);
    for (int i = 0; i < 4; i++) p[i * PAGE + 5] = 10 + i;
    say("dontneed", madvise(p + PAGE, 2 * PAGE, MADV_DONTNEED));
    printf("present-after-dontneed: %d %d %d %d\n", present(pm, p), present(pm, p + PAGE), present(pm, p + 2 * PAGE), present(pm, p + 3 * PAGE));
    row("anon", pm, p, 4);
    say("free", madvise(p, PAGE, MADV_FREE));
    p[5] = 42;
    row("rewritten", pm, p, 1);
    say("dontneed-unaligned", madvise(p + 1, PAGE, MADV_DONTNEED));
    say("dontneed-hole", madvise(p + 4 * PAGE, PAGE, MADV_DONTNEED));
    char *s = mmap(NULL, 2 * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    s[5] = 7;
    s[PAGE + 5] = 8;
    say("dontneed-shared", madvise(s, 2 * PAGE, MADV_DONTNEED));
    /* Values only: Linux's fault-around maps the neighbouring shmem page on the first
     * read, ours does not (docs/linux-programs.md). */
    printf("shared-kept: %d %d\n", s[5], s[PAGE + 5]);
    say("free-shared", madvise(s, PAGE, MADV_FREE));
    int fd = open("mem-file", O_RDWR | O_CREAT | O_TRUNC, 0644);
    unlink("mem-file");
    char page[PAGE];
    memset(page, 3, sizeof page);
    write(fd, page, PAGE);
    char *f = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    f[5] = 99;
    row("private-written", pm, f, 1);
    say("dontneed-private-file", madvise(f, PAGE, MADV_DONTNEED));
    row("private-file-again", pm, f, 1);
    munmap(p, 4 * PAGE);
    munmap(s, 2 * PAGE);
    munmap(f, PAGE);
    close(fd);
    /* smaps of a large reservation with one page written: one page resident. */
    char *big = mmap(NULL, 8UL << 30, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    big[12345] = 1;
    static char smaps[1 << 16];
    int sm = open("/proc/self/smaps", O_RDONLY);
    long got = 0, r;
    while (got < (long)sizeof smaps - 1 && (r = read(sm, smaps + got, sizeof smaps - 1 - got)) > 0) got += r;
    char head[32];
    snprintf(head, sizeof head, "%lx-", (unsigned long)big);
    char *block = strstr(smaps, head);
    long size_kb = -1, rss_kb = -1;
    if (block) {
        sscanf(strstr(block, "\nSize:"), "\nSize: %ld kB", &size_kb);
        sscanf(strstr(block, "\nRss:"), "\nRss: %ld kB", &rss_kb);
    }
    printf("big-smaps: size=%ld rss=%ld\n", size_kb, rss_kb);
    munmap(big, 8UL << 30);
    char status[4096] = {0};
    int st = open("/proc/self/status", O_RDONLY);
    long n = read(st, status, sizeof status - 1);
    printf("status-read=%d\n", n > 0);
    char name[64] = {0}, state[64] = {0};
    int pid = -1, threads = -1;
    long rss = -1;
    sscanf(strstr(status, "Name:"), "Name:\t%63s", name);
    sscanf(strstr(status, "State:"), "State:\t%63[^\n]", state);
    sscanf(strstr(status, "\nPid:"), "\nPid:\t%d", &pid);
    sscanf(strstr(status, "Threads:"), "Threads:\t%d", &threads);
    sscanf(strstr(status, "VmRSS:"), "VmRSS:\t%ld kB", &rss);
    printf("name=%s state=%s pid-matches=%d threads=%d rss-positive=%d\n", name, state, pid == getpid(), threads, rss > 0);
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/status", getpid());
    say("by-pid", open(path, O_RDONLY) >= 0 ? 0 : -1);
    say("no-such-pid", open("/proc/2147483647/status", O_RDONLY));
    return 0;
}
