/*
 * hostile/flood.c - writes to stdout forever.
 *
 * The sandbox must cap captured output (and then stop the guest, or discard the
 * excess) and stop it by fuel or deadline. Write errors are ignored so that a
 * closed or full pipe does not end the flood by itself.
 */
#include <string.h>
#include <unistd.h>

int main(void)
{
    static char block[4096];
    static const char line[] = "flood flood flood flood flood flood flood flood flood flood flood\n";
    /* Fill a 4 KiB block with copies of the line (the last one may be cut short). */
    for (size_t i = 0; i < sizeof block; i++)
        block[i] = line[i % (sizeof line - 1)];
    for (;;)
        (void)write(STDOUT_FILENO, block, sizeof block);
}
