/*
 * primes.c - the demo guest for spare.
 *
 * Counts the primes below N with a sieve of Eratosthenes, where N is argv[1]
 * (default 100000), and prints e.g.
 *
 *     primes below 100000: 9592
 *
 * It also exercises the three other inputs a task can carry:
 *   - environment: if GREETING is set, its value is printed on the first line;
 *   - stdin: if stdin is not empty (and not a terminal), up to 1 MiB of it is
 *     read and a line `stdin: <n> bytes, sum <s>` is printed, where <s> is the
 *     sum of the whitespace-separated integers in it (other words are skipped),
 *     so `echo 1 2 3 | primes` prints `stdin: 6 bytes, sum 6`.
 *
 * The output depends only on the inputs, so the same task always produces the
 * same bytes. Exit status: 0, or 2 if argv[1] is not a number.
 *
 * Build: clang --target=wasm32-wasi --sysroot=/usr -O2 -s -o primes.wasm primes.c
 */
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define DEFAULT_N 100000UL
#define MAX_N 100000000UL         /* 100 M: the sieve then needs 100 MB */
#define STDIN_LIMIT (1u << 20)    /* read at most 1 MiB of stdin */

/* Number of primes p with 2 <= p < n. */
static unsigned long count_primes_below(unsigned long n)
{
    if (n < 3)
        return 0;
    /* composite[i] != 0 means i is not prime. */
    unsigned char *composite = calloc(n, 1);
    if (composite == NULL) {
        fprintf(stderr, "primes: out of memory for n=%lu\n", n);
        exit(1);
    }
    unsigned long count = 0;
    for (unsigned long i = 2; i < n; i++) {
        if (composite[i])
            continue;
        count++;
        if (i > (n - 1) / i)
            continue; /* i * i >= n: nothing left to cross out (and no overflow) */
        for (unsigned long j = i * i; j < n; j += i)
            composite[j] = 1;
    }
    free(composite);
    return count;
}

/* Reads up to STDIN_LIMIT bytes of stdin into *out; returns the byte count. */
static size_t read_stdin(char **out)
{
    char *buf = malloc(STDIN_LIMIT + 1);
    if (buf == NULL) {
        fprintf(stderr, "primes: out of memory for stdin\n");
        exit(1);
    }
    size_t len = 0;
    while (len < STDIN_LIMIT) {
        ssize_t got = read(STDIN_FILENO, buf + len, STDIN_LIMIT - len);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            break; /* EOF, or no readable stdin at all: treat as empty */
        len += (size_t)got;
    }
    buf[len] = '\0';
    *out = buf;
    return len;
}

/*
 * Sum of the whitespace-separated tokens that are integers. Words that are not
 * integers are skipped; the sum wraps around modulo 2^64 instead of overflowing.
 */
static int64_t sum_integers(const char *text)
{
    uint64_t sum = 0;
    const char *p = text;
    while (*p != '\0') {
        while (*p != '\0' && isspace((unsigned char)*p))
            p++;
        if (*p == '\0')
            break;
        const char *word = p;
        while (*p != '\0' && !isspace((unsigned char)*p))
            p++;
        char *end;
        errno = 0;
        long long value = strtoll(word, &end, 10);
        if (end == p && end != word && errno == 0)
            sum += (uint64_t)value;
    }
    return (int64_t)sum;
}

int main(int argc, char **argv)
{
    unsigned long n = DEFAULT_N;
    if (argc > 1) {
        char *end;
        errno = 0;
        n = strtoul(argv[1], &end, 10);
        if (argv[1][0] == '\0' || argv[1][0] == '-' || *end != '\0' || errno != 0 || n > MAX_N) {
            fprintf(stderr, "usage: primes [N]  (0 <= N <= %lu), got '%s'\n", MAX_N, argv[1]);
            return 2;
        }
    }

    const char *greeting = getenv("GREETING");
    if (greeting != NULL)
        printf("%s\n", greeting);

    printf("primes below %lu: %lu\n", n, count_primes_below(n));

    /* An interactive terminal is never read, so `wasmtime run primes.wasm` does not wait. */
    if (!isatty(STDIN_FILENO)) {
        char *input;
        size_t len = read_stdin(&input);
        if (len > 0)
            printf("stdin: %zu bytes, sum %" PRId64 "\n", len, sum_integers(input));
        free(input);
    }
    return 0;
}
