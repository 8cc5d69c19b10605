/* The offsets, devices, inodes and names /proc/self/maps gives a program's mappings
 * (a file mapped shared twice, privately, split by mprotect, unlinked while mapped; a
 * file in /tmp; shared anonymous memory split in two; the heap, the stack), and what
 * smaps counts of them and pagemap's file and exclusive bits, against a Linux host's. tests/linux_exec.rs runs it on the host
 * and in the guest and compares every line; what differs between machines (addresses,
 * the working directory, our pid, device and inode numbers) is printed as how it
 * relates (a path under "CWD", ids "file": the device and inode fstat gives). */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>
static char text[1 << 16];
static void load(const char *path) {
    int fd = open(path, O_RDONLY);
    long got = 0, r;
    while (got < (long)sizeof text - 1 && (r = read(fd, text + got, sizeof text - 1 - got)) > 0) got += r;
    text[got] = 0;
    close(fd);
}
/* The maps line of the mapping that starts at `at`. */
static char *line_of(void *at, char *out, size_t n) {
    char head[32];
    snprintf(head, sizeof head, "%lx-", (unsigned long)at);
    for (char *l = text; *l; l = strchr(l, '\n') + 1) {
        if (strncmp(l, head, strlen(head)) == 0 && (l == text || l[-1] == '\n')) {
            size_t len = strcspn(l, "\n");
            snprintf(out, n, "%.*s", (int)len, l);
            return out;
        }
        if (!strchr(l, '\n')) break;
    }
    return NULL;
}
/* The kB value of smaps field `name` in the block that starts at `b`. */
static long field(const char *b, const char *name) {
    const char *f = strstr(b, name);
    return f ? atol(f + strlen(name)) : -1;
}
static char cwd[256];
/* One mapping: its permissions, offset and name (the working directory and our pid
 * written as such), the column its name starts at, and whether its device and inode
 * are the file's (`fd`; -1: none, they must be 0). */
static void show(const char *label, void *at, int fd) {
    char l[512];
    load("/proc/self/maps");
    if (!line_of(at, l, sizeof l)) { printf("%s: no line\n", label); return; }
    char perms[8], dev[16];
    unsigned long long off, ino;
    int name_at = 0;
    sscanf(l, "%*s %7s %llx %15s %llu %n", perms, &off, dev, &ino, &name_at);
    char *name = l + name_at;
    int col = *name ? (int)(name - l) : 0;
    char shown[300];
    size_t cl = strlen(cwd);
    char pid[16];
    snprintf(pid, sizeof pid, "%d", (int)getpid());
    if (strncmp(name, cwd, cl) == 0 && name[cl] == '/') snprintf(shown, sizeof shown, "CWD%s", name + cl);
    else if (strcmp(cwd, "/") == 0 && name[0] == '/' && strncmp(name, "/tmp/", 5) != 0 && strncmp(name, "/dev/", 5) != 0) snprintf(shown, sizeof shown, "CWD%s", name);
    else snprintf(shown, sizeof shown, "%s", name);
    char *p = strncmp(shown, "/tmp/", 5) == 0 ? strstr(shown, pid) : NULL;
    if (p) { char rest[300]; snprintf(rest, sizeof rest, "%s", p + strlen(pid)); snprintf(p, shown + sizeof shown - p, "PID%s", rest); }
    unsigned maj, min;
    sscanf(dev, "%x:%x", &maj, &min);
    int same;
    if (fd >= 0) {
        struct stat st;
        fstat(fd, &st);
        same = st.st_ino == ino && major(st.st_dev) == maj && minor(st.st_dev) == min;
    } else {
        same = ino == 0 && maj == 0 && min == 0;
    }
    printf("%s: %s %08llx col=%d ids=%s name=%s\n", label, perms, off, col, fd >= 0 ? (same ? "file" : "other") : (same ? "none" : (ino ? "own" : "other")), shown);
    /* pagemap of its first page: present, PM_FILE (a file's or shared memory's page,
     * not anonymous), PM_MMAP_EXCLUSIVE (mapped once). */
    unsigned long long e = 0;
    int pm = open("/proc/self/pagemap", O_RDONLY);
    pread(pm, &e, 8, (unsigned long)at / 4096 * 8);
    close(pm);
    printf("  present=%d file=%d exclusive=%d\n", (int)(e >> 63), (int)(e >> 61 & 1), (int)(e >> 56 & 1));
    load("/proc/self/smaps");
    char head[32];
    snprintf(head, sizeof head, "%lx-", (unsigned long)at);
    char *b = strstr(text, head);
    if (!b) { printf("  no smaps\n"); return; }
    /* Clean and dirty apart would be the host file system's (its writeback). */
    long rss = field(b, "Rss:"), shared = field(b, "Shared_Clean:") + field(b, "Shared_Dirty:");
    long priv = field(b, "Private_Clean:") + field(b, "Private_Dirty:");
    printf("  rss=%ld shared=%ld private=%ld anonymous=%ld\n", rss, shared, priv, field(b, "Anonymous:"));
}
int main(void) {
    getcwd(cwd, sizeof cwd);
    static char page[16384];
    memset(page, 'f', sizeof page);
    int fd = open("mapped", O_RDWR | O_CREAT | O_TRUNC, 0644);
    write(fd, page, sizeof page);
    char *sh = mmap(NULL, 16384, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    /* Every page touched: Linux's fault-around maps the neighbours of a read anyway. */
    sh[0] = 1;
    sh[4096] = 2;
    volatile char c = sh[8192] + sh[12288];
    show("file-shared", sh, fd);
    char *off = mmap(NULL, 8192, PROT_READ, MAP_SHARED, fd, 8192);
    c = off[0] + off[4096];
    (void)c;
    show("file-offset", off, fd);
    char *pr = mmap(NULL, 16384, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    pr[0] = 3;
    show("file-private", pr, fd);
    mprotect(sh + 4096, 4096, PROT_READ);
    show("file-split", sh + 4096, fd);
    show("file-split-rest", sh + 8192, fd);
    char tmp[64];
    snprintf(tmp, sizeof tmp, "/tmp/sdvmm-maps-%d", (int)getpid());
    int tfd = open(tmp, O_RDWR | O_CREAT | O_TRUNC, 0600);
    ftruncate(tfd, 4096);
    char *tm = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, tfd, 0);
    tm[0] = 1;
    unlink(tmp);
    show("tmp-unlinked", tm, tfd);
    char *an = mmap(NULL, 16384, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    an[0] = 1;
    an[8192] = 1;
    mprotect(an + 8192, 8192, PROT_READ);
    show("shared-anon", an, -1);
    show("shared-anon-split", an + 8192, -1);
    char *pa = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    pa[0] = 1;
    show("private-anon", pa, -1);
    char *heap = malloc(200000 - 100000); /* below the mmap threshold: from brk */
    heap[0] = 1;
    load("/proc/self/maps");
    int has_heap = strstr(text, " [heap]\n") != NULL, has_stack = strstr(text, " [stack]\n") != NULL;
    printf("heap=%d stack=%d\n", has_heap, has_stack);
    for (int k = 0; k < 2; k++) {
        char *at = strstr(text, k ? " [stack]\n" : " [heap]\n");
        if (!at) continue;
        while (at > text && at[-1] != '\n') at--;
        char perms[8], dev[16];
        unsigned long long o, ino;
        sscanf(at, "%*s %7s %llx %15s %llu", perms, &o, dev, &ino);
        printf("%s: %s %08llx %s %llu\n", k ? "stack" : "heap", perms, o, dev, ino);
    }
    unlink("mapped");
    show("file-deleted", sh, fd);
    return 0;
}
