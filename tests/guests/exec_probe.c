/* A tiny WASI command for tests/test_exec.py: shows what the runtime gave it.
 *   probe exit N          print argv and environ, exit with N
 *   probe files DIR       copy DIR/in.txt to DIR/out.txt (upper-cased), print it
 *   probe echo            copy stdin to stdout
 *   probe trap            execute an unreachable instruction
 */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern char **environ;

int main(int argc, char **argv) {
    for (int i = 0; i < argc; i++) printf("argv[%d]=%s\n", i, argv[i]);
    for (char **e = environ; *e != NULL; e++) printf("env %s\n", *e);
    if (argc < 2) return 0;
    if (strcmp(argv[1], "exit") == 0 && argc > 2) {
        fflush(stdout);
        exit(atoi(argv[2]));
    }
    if (strcmp(argv[1], "files") == 0 && argc > 2) {
        char path[512], text[256] = {0};
        snprintf(path, sizeof path, "%s/in.txt", argv[2]);
        FILE *in = fopen(path, "r");
        if (in == NULL) { perror(path); return 4; }
        size_t n = fread(text, 1, sizeof text - 1, in);
        fclose(in);
        for (size_t i = 0; i < n; i++) text[i] = (char)toupper((unsigned char)text[i]);
        snprintf(path, sizeof path, "%s/out.txt", argv[2]);
        FILE *out = fopen(path, "w");
        if (out == NULL) { perror(path); return 5; }
        fwrite(text, 1, n, out);
        fclose(out);
        printf("copied %s\n", text);
        return 0;
    }
    if (strcmp(argv[1], "echo") == 0) {
        int c;
        while ((c = getchar()) != EOF) putchar(c);
        return 0;
    }
    if (strcmp(argv[1], "trap") == 0) {
        fflush(stdout);
        __builtin_trap();
    }
    return 0;
}
