/*
 * echo.c - a test helper guest that reflects its inputs, so a test can check
 * exactly what the sandbox handed to the guest and what it captured.
 *
 * Output on stdout, in this order:
 *     arg[1]=<argv[1]>           one line per argument, argv[0] excluded
 *     arg[2]=<argv[2]>
 *     env K=V                    one line per environment variable, in environ order
 *     stdin:                     then all of stdin, copied verbatim (not read when
 *     <stdin bytes...>           stdin is a terminal)
 * Output on stderr:
 *     to stderr
 * Exit status: the value of env EXIT_CODE (default 0).
 *
 * Build: clang --target=wasm32-wasi --sysroot=/usr -O2 -s -o echo.wasm echo.c
 */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

extern char **environ;

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++)
        printf("arg[%d]=%s\n", i, argv[i]);

    for (char **e = environ; e != NULL && *e != NULL; e++)
        printf("env %s\n", *e);

    fputs("stdin:\n", stdout);
    if (!isatty(STDIN_FILENO)) {
        char buf[4096];
        size_t got;
        while ((got = fread(buf, 1, sizeof buf, stdin)) > 0)
            fwrite(buf, 1, got, stdout);
    }
    fflush(stdout);

    fputs("to stderr\n", stderr);

    const char *code = getenv("EXIT_CODE");
    return code != NULL ? atoi(code) : 0;
}
