/*
 * hostile/crash.c - traps deliberately.
 *
 * Prints one line to stdout first (so a test can check that output written
 * before a trap is kept), then executes the wasm `unreachable` instruction.
 * The sandbox must report the trap with a clear message and a failure status.
 * (A null pointer dereference would not do: address 0 is valid wasm memory.)
 */
#include <unistd.h>

int main(void)
{
    static const char msg[] = "crash: about to trap\n";
    (void)write(STDOUT_FILENO, msg, sizeof msg - 1);
    __builtin_trap();
}
