/*
 * hostile/loop.c - spins forever without doing any I/O.
 *
 * The sandbox must stop it by fuel exhaustion, an epoch/wall-clock deadline, or
 * both. The counter is volatile so every iteration is a real memory write the
 * compiler cannot remove, and the loop condition is a constant, so C does not
 * let the compiler assume that the loop ends.
 */
volatile unsigned long long counter;

int main(void)
{
    for (;;)
        counter++;
}
