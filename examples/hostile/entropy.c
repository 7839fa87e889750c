/*
 * hostile/entropy.c - asks the host for 16 MiB of random bytes at a time,
 * forever.
 *
 * Each call costs the guest a few units of fuel but the host milliseconds of
 * work, so this guest spends its life inside host calls and reaches a fuel
 * yield only after hours. The sandbox must still stop it at its wall-time
 * limit, and when its task is cancelled.
 */
#include <stdlib.h>
#include <wasi/api.h>

int main(void)
{
    size_t size = 16 << 20;
    uint8_t *buf = malloc(size);
    if (!buf)
        return 1;
    for (;;)
        if (__wasi_random_get(buf, size) != 0)
            return 2;
}
