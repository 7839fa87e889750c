/*
 * hostile/recurse.c - recurses without bound until the call stack runs out.
 *
 * The sandbox must report the stack overflow (wasmtime: "call stack exhausted")
 * as a clean failure of the guest, not crash the host.
 *
 * The recursion cannot be turned into a loop by the optimizer: each call goes
 * through a volatile function pointer (so it cannot be inlined or recognised as
 * self-recursion), and its result is used after it returns (so it is not a tail
 * call). Its state lives in wasm locals only, so it exhausts the engine's call
 * stack rather than overrunning the C shadow stack in linear memory.
 */
static unsigned descend(unsigned depth);

static unsigned (*volatile next_call)(unsigned) = descend;
volatile unsigned deepest; /* the depth reached, stored on every call */

__attribute__((noinline)) static unsigned descend(unsigned depth)
{
    deepest = depth;
    return next_call(depth + 1) ^ depth;
}

int main(void)
{
    return (int)next_call(0);
}
