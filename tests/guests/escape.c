/* A hostile WASI command for tests/test_guest_confinement.py: it tries what a
 * malicious chat app would try against the device that runs it.
 *
 * For every path in TARGETS (the home's own files: relative, climbing with "..",
 * absolute, and HOME "/…" with the home's real path, which the test compiles in with
 * -DHOME=...) it tries to create an executable file and to read the file, then tries
 * "own.txt" in ".", and prints one line per attempt:
 *   create PATH: ok | create PATH: denied (reason)
 *   read PATH: ok <first bytes> | read PATH: denied (reason)
 * It ignores its own arguments (it is started with whatever tail its app kind gets).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef HOME
#define HOME "/nonexistent-home"
#endif

static const char *TARGETS[] = {
    "venv/bin/x", "config.toml", "runtime/current/bin/wasmedge",
    "../config.toml", "../../config.toml", "../../../config.toml", "../../../venv/bin/x",
    "/config.toml", "/venv/bin/x", "/x",
    HOME "/venv/bin/x", HOME "/config.toml", HOME "/runtime/current/bin/wasmedge",
    HOME "/apps/x", "own.txt",
};

static void try_create(const char *path) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0755);
    if (fd < 0) {
        printf("create %s: denied (%s)\n", path, strerror(errno));
        return;
    }
    const char payload[] = "#!/bin/sh\necho escaped\n";
    ssize_t n = write(fd, payload, sizeof payload - 1);
    close(fd);
    printf("create %s: %s\n", path, n == (ssize_t)(sizeof payload - 1) ? "ok" : "partial");
}

static void try_read(const char *path) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) {
        printf("read %s: denied (%s)\n", path, strerror(errno));
        return;
    }
    char text[64] = {0};
    ssize_t n = read(fd, text, sizeof text - 1);
    close(fd);
    for (ssize_t i = 0; i < n; i++)
        if (text[i] == '\n') text[i] = ' ';
    printf("read %s: ok %s\n", path, n >= 0 ? text : "");
}

int main(void) {
    for (size_t i = 0; i < sizeof TARGETS / sizeof TARGETS[0]; i++) {
        try_read(TARGETS[i]);
        try_create(TARGETS[i]);
    }
    printf("mkdir ../escaped: %s\n", mkdir("../escaped", 0755) == 0 ? "ok" : strerror(errno));
    printf("done\n");
    fflush(stdout);
    return 0;
}
