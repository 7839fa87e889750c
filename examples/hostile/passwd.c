/*
 * hostile/passwd.c - tries to read a host file it must not see.
 *
 * A guest gets no preopened directories, so fopen must fail. Expected output:
 *     stderr: cannot open /etc/passwd: <reason>      exit status 1
 * If the sandbox ever leaked the host file system, it would print the first line
 * of the file and exit 0, which a test must treat as a failure.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>

int main(void)
{
    FILE *f = fopen("/etc/passwd", "r");
    if (f == NULL) {
        fprintf(stderr, "cannot open /etc/passwd: %s\n", strerror(errno));
        return 1;
    }
    char line[512];
    if (fgets(line, sizeof line, f) != NULL)
        fputs(line, stdout);
    fclose(f);
    return 0;
}
