/*
 * cpubound.c - a deterministic CPU-bound benchmark kernel.
 *
 * The same source builds both as a WASI guest and as a native program, so the
 * cost of fuel-metered wasm can be compared with native speed:
 *
 *     clang --target=wasm32-wasi --sysroot=/usr -O2 -s -o cpubound.wasm cpubound.c
 *     clang -O2 -o cpubound cpubound.c
 *
 * Usage: cpubound [ROUNDS]   (default 100, about 1 s natively on a current x86-64 core)
 *
 * Each round runs three kernels with round-dependent parameters and folds their
 * results into a 64-bit checksum:
 *   1. a sieve of Eratosthenes below 2^20 (memory-bound inner loops),
 *   2. integer hashing: a splitmix64 / xorshift chain (64-bit multiplies, shifts),
 *   3. a fixed-point Mandelbrot escape-time count (branchy integer arithmetic).
 * Only integer arithmetic with defined wrap-around is used, so the checksum is the
 * same on every platform, wasm or native. Output (one line):
 *
 *     cpubound: rounds=100 checksum=0x................
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DEFAULT_ROUNDS 100
#define SIEVE_LIMIT (1u << 20)
#define HASH_STEPS (1u << 20)
#define MANDEL_SIZE 256   /* a MANDEL_SIZE x MANDEL_SIZE grid */
#define MANDEL_ITERS 128
#define FIX_SHIFT 24      /* fixed point: value = raw / 2^24 */

/* Folds v into the running checksum h (order-sensitive). */
static uint64_t mix(uint64_t h, uint64_t v)
{
    h ^= v + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
    return h;
}

/* Kernel 1: count and sum the primes below `limit` (each prime xor-ed with the round). */
static uint64_t sieve_kernel(unsigned char *composite, uint32_t limit, uint32_t round)
{
    memset(composite, 0, limit);
    uint64_t count = 0, sum = 0;
    for (uint32_t i = 2; i < limit; i++) {
        if (composite[i])
            continue;
        count++;
        sum += i ^ round;
        if (i > (limit - 1) / i)
            continue;
        for (uint32_t j = i * i; j < limit; j += i)
            composite[j] = 1;
    }
    return (count << 32) ^ sum;
}

/* Kernel 2: a chain of splitmix64 steps, each result perturbed by a xorshift. */
static uint64_t hash_kernel(uint64_t seed, uint32_t steps)
{
    uint64_t x = seed, acc = 0;
    for (uint32_t i = 0; i < steps; i++) {
        x += 0x9e3779b97f4a7c15ULL;
        uint64_t z = x;
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
        z ^= z >> 31;
        acc ^= z;
        acc ^= acc << 13;
        acc ^= acc >> 7;
        acc ^= acc << 17;
    }
    return acc;
}

/* Kernel 3: total escape-time iterations over a grid covering [-2,1] x [-1.5,1.5]. */
static uint64_t mandel_kernel(uint32_t round)
{
    const int64_t one = (int64_t)1 << FIX_SHIFT;
    const int64_t escape = 4 * one;
    /* Shift the window slightly each round so rounds differ. */
    const int64_t x0 = -2 * one + (int64_t)(round % 16) * (one / 256);
    const int64_t y0 = -3 * one / 2;
    const int64_t step = 3 * one / MANDEL_SIZE;
    uint64_t total = 0;
    for (int py = 0; py < MANDEL_SIZE; py++) {
        int64_t ci = y0 + py * step;
        for (int px = 0; px < MANDEL_SIZE; px++) {
            int64_t cr = x0 + px * step;
            int64_t zr = 0, zi = 0;
            int n = 0;
            while (n < MANDEL_ITERS) {
                int64_t zr2 = (zr * zr) >> FIX_SHIFT;
                int64_t zi2 = (zi * zi) >> FIX_SHIFT;
                if (zr2 + zi2 > escape)
                    break;
                zi = ((zr * zi) >> (FIX_SHIFT - 1)) + ci;
                zr = zr2 - zi2 + cr;
                n++;
            }
            total += (uint64_t)n;
        }
    }
    return total;
}

int main(int argc, char **argv)
{
    long rounds = DEFAULT_ROUNDS;
    if (argc > 1) {
        char *end;
        rounds = strtol(argv[1], &end, 10);
        if (argv[1][0] == '\0' || *end != '\0' || rounds < 0 || rounds > 1000000) {
            fprintf(stderr, "usage: cpubound [ROUNDS]  (0..1000000), got '%s'\n", argv[1]);
            return 2;
        }
    }

    unsigned char *composite = malloc(SIEVE_LIMIT);
    if (composite == NULL) {
        fprintf(stderr, "cpubound: out of memory\n");
        return 1;
    }

    uint64_t checksum = 0;
    for (long r = 0; r < rounds; r++) {
        uint32_t round = (uint32_t)r;
        checksum = mix(checksum, sieve_kernel(composite, SIEVE_LIMIT, round));
        checksum = mix(checksum, hash_kernel(checksum ^ round, HASH_STEPS));
        checksum = mix(checksum, mandel_kernel(round));
    }
    free(composite);

    printf("cpubound: rounds=%ld checksum=0x%016" PRIx64 "\n", rounds, checksum);
    return 0;
}
