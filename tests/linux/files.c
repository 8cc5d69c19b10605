/* The file system of a Linux program in our guest, against a Linux host's: files
 * created, written (with holes, appended), read back, truncated down and up, mapped
 * MAP_SHARED (stores through the mapping are the file's bytes, writes to the file are
 * seen in the mapping) and MAP_PRIVATE (a copy), unlinked while open and mapped, and
 * the errors Linux gives. tests/linux_exec.rs runs it on the host and in the guest and
 * compares every line. Paths are relative (the working directory) or under /tmp. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
static char buf[30000];
static void say(const char *what, long r) { printf("%s=%ld errno=%d\n", what, r, r < 0 ? errno : 0); errno = 0; }
int main(void) {
    char tmp[64];
    snprintf(tmp, sizeof tmp, "/tmp/sdvmm-files-%d", (int)getpid());
    for (int i = 0; i < 10000; i++) buf[i] = 'a' + i % 26;
    int fd = open("t1", O_RDWR | O_CREAT | O_EXCL, 0644);
    say("open", fd >= 0 ? 0 : -1);
    say("write", write(fd, buf, 10000));
    say("excl", open("./t1", O_RDWR | O_CREAT | O_EXCL, 0644));
    say("lseek", lseek(fd, 0, SEEK_SET));
    char back[10000];
    say("read", read(fd, back, sizeof back));
    printf("same=%d\n", memcmp(back, buf, 10000) == 0);
    say("pwrite-hole", pwrite(fd, "HELLO", 5, 20000));
    struct stat st;
    fstat(fd, &st);
    printf("size=%ld nlink=%ld mode=%o\n", (long)st.st_size, (long)st.st_nlink, st.st_mode);
    char hole[8] = {1, 1, 1, 1, 1, 1, 1, 1};
    say("pread-hole", pread(fd, hole, 8, 12000));
    printf("hole=%d%d%d%d\n", hole[0], hole[1], hole[6], hole[7]);
    say("ftruncate", ftruncate(fd, 5000));
    say("pread-end", pread(fd, back, 20, 4990));
    say("ftruncate-grow", ftruncate(fd, 8192));
    say("pread-grown", pread(fd, back, 8, 5000));
    printf("grown=%d%d\n", back[0], back[7]);
    char *shared = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    say("mmap-shared", shared == MAP_FAILED ? -1 : 0);
    printf("mapped=%c%c%c\n", shared[0], shared[25], shared[4999]);
    shared[1] = 'X';
    char c = 0;
    pread(fd, &c, 1, 1);
    printf("store-through-map=%c\n", c);
    pwrite(fd, "W", 1, 2);
    printf("write-seen-in-map=%c\n", shared[2]);
    char *priv = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    say("mmap-private", priv == MAP_FAILED ? -1 : 0);
    printf("private=%c%c\n", priv[1], priv[2]);
    priv[3] = 'P';
    pread(fd, &c, 1, 3);
    printf("private-store-stays=%c%c\n", priv[3], c);
    char *paged = mmap(NULL, 4096, PROT_READ, MAP_SHARED, fd, 4096);
    printf("offset-map=%d\n", paged[0]);
    say("munmap", munmap(paged, 4096));
    say("unlink", unlink("t1"));
    say("stat-gone", stat("t1", &st));
    fstat(fd, &st);
    printf("nlink-after-unlink=%ld size=%ld\n", (long)st.st_nlink, (long)st.st_size);
    printf("still-mapped=%c\n", shared[1]);
    say("close", close(fd));
    printf("mapped-after-close=%c\n", shared[0]);
    munmap(shared, 8192);
    munmap(priv, 8192);
    int a = open(tmp, O_WRONLY | O_CREAT | O_APPEND, 0600);
    say("append1", write(a, "one,", 4));
    lseek(a, 0, SEEK_SET);
    say("append2", write(a, "two", 3));
    close(a);
    int r = open(tmp, O_RDONLY);
    char txt[16] = {0};
    say("read-append", read(r, txt, 15));
    printf("text=%s\n", txt);
    say("write-rdonly", write(r, "x", 1));
    char *ro = mmap(NULL, 4096, PROT_READ, MAP_SHARED, r, 0);
    say("mprotect-rdonly-fd", mprotect(ro, 4096, PROT_READ | PROT_WRITE));
    say("mmap-rw-rdonly-fd", (long)mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, r, 0) == -1 ? -1 : 0);
    close(r);
    int t = open(tmp, O_RDWR | O_TRUNC);
    fstat(t, &st);
    printf("trunc-size=%ld\n", (long)st.st_size);
    close(t);
    say("unlink-tmp", unlink(tmp));
    say("unlink-again", unlink(tmp));
    say("no-dir", open("/no/such/dir/x", O_RDWR | O_CREAT, 0644));
    say("not-created", open("never", O_RDONLY));
    char *anon = mmap(NULL, 3 * 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    say("mmap-shared-anon", anon == MAP_FAILED ? -1 : 0);
    printf("anon=%d", anon[5000]);
    anon[5000] = 7;
    printf(",%d\n", anon[5000]);
    munmap(anon, 3 * 4096);
    char cwd[64];
    printf("getcwd=%s\n", getcwd(cwd, sizeof cwd) ? "ok" : "fail");
    return 0;
}
