/* The hostile capsule's syscall helper: each action attempts one forbidden thing directly (no libc
 * wrappers that refuse early) and prints what the kernel answered, so a test can see the attempt fail
 * from inside. Built static by e2e/node/conftest.py into a throwaway image; never shipped. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/personality.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <unistd.h>

static int report(const char *what, long rc) {
    printf("%s rc=%ld errno=%s\n", what, rc, rc < 0 ? strerror(errno) : "none");
    fflush(stdout);
    return rc < 0 ? 0 : 3; /* 3: the forbidden thing succeeded */
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    const char *a = argv[1];
    if (!strcmp(a, "mount")) return report("mount", mount("none", "/scratch", "tmpfs", 0, NULL));
    if (!strcmp(a, "module")) {
        static char junk[64];
        return report("init_module", syscall(SYS_init_module, junk, sizeof junk, ""));
    }
    if (!strcmp(a, "rawsock")) return report("raw socket", socket(AF_INET, SOCK_RAW, 1));
    if (!strcmp(a, "packetsock")) return report("packet socket", socket(AF_PACKET, SOCK_RAW, 0));
    if (!strcmp(a, "blockdev")) {
        const char *devs[] = {"/dev/sda", "/dev/vda", "/dev/nvme0n1", "/dev/loop0", "/dev/mmcblk0"};
        int bad = 0;
        for (unsigned i = 0; i < sizeof devs / sizeof *devs; i++) {
            char what[64];
            snprintf(what, sizeof what, "open %s", devs[i]);
            bad |= report(what, open(devs[i], O_RDONLY));
        }
        bad |= report("mknod /scratch/blk b 7 0", mknod("/scratch/blk", S_IFBLK | 0600, makedev(7, 0)));
        return bad;
    }
    if (!strcmp(a, "setuid")) {
        printf("euid=%d\n", (int)geteuid());
        int bad = report("setuid(0)", setuid(0));
        printf("euid-after=%d\n", (int)geteuid());
        return bad || geteuid() == 0 ? 3 : 0;
    }
    if (!strcmp(a, "ptrace")) return report("ptrace(TRACEME)", ptrace(PTRACE_TRACEME, 0, 0, 0));
    if (!strcmp(a, "userns")) return report("unshare(CLONE_NEWUSER)", unshare(CLONE_NEWUSER));
    if (!strcmp(a, "write32")) { /* the i386 ABI from a 64-bit process: audit rules must cover it too */
        static const char path[] = "/etc/evil32";
        long rc;
        __asm__ volatile("int $0x80" : "=a"(rc) : "a"(5L), "b"(path), "c"(0101L), "d"(0644L) : "memory");
        printf("open32 /etc/evil32 rc=%ld\n", rc);
        fflush(stdout);
        return rc < 0 ? 0 : 3;
    }
    /* allowed by an allow-all profile, refused by an allowlist: turning off the process's own ASLR */
    if (!strcmp(a, "noaslr")) return report("personality(ADDR_NO_RANDOMIZE)", syscall(SYS_personality, ADDR_NO_RANDOMIZE));
    if (!strcmp(a, "persona")) { /* positive control: the query Docker's default profile allows */
        long rc = syscall(SYS_personality, 0xffffffffUL);
        printf("personality query rc=%ld\n", rc);
        return rc < 0 ? 4 : 0;
    }
    if (!strcmp(a, "true")) { puts("helper ran"); return 0; }
    return 2;
}
