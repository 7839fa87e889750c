/*
 * hostile/alloc.c - allocates memory forever.
 *
 * Grabs 1 MiB chunks in a loop and writes to every byte of each, so the memory
 * is really committed. The chunks are chained into a list reachable from a
 * volatile global, so the compiler cannot prove them unused and drop the
 * allocations. When malloc returns NULL (the linear memory cannot grow any
 * more), it keeps retrying forever: the sandbox must enforce a memory limit and
 * then stop the guest by fuel or deadline.
 */
#include <stdlib.h>
#include <string.h>

#define CHUNK (1024 * 1024)

struct chunk {
    struct chunk *next;
};

struct chunk *volatile head; /* keeps every chunk reachable */
volatile unsigned long long failures;

int main(void)
{
    for (;;) {
        struct chunk *c = malloc(CHUNK);
        if (c == NULL) {
            failures++; /* out of memory: try again, and again */
            continue;
        }
        memset(c, 0xA5, CHUNK); /* touch every page */
        c->next = head;
        head = c;
    }
}
