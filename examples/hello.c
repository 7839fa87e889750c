/*
 * hello.c - the smallest useful guest: prints "hello from spare" and exits 0.
 * Used as the trivial task in dispatch benchmarks, so it is kept tiny.
 *
 * It skips the C library's start-up code (no argv/environ setup, no stdio, no
 * malloc): `_start` is the entry point that WASI runs, and it makes a single
 * fd_write call. Returning from `_start` means exit status 0.
 *
 * Build: clang --target=wasm32-wasi --sysroot=/usr -O2 -s -nostartfiles -o hello.wasm hello.c
 * (-nostartfiles: no crt1; wasm-ld then exports this `_start` as the entry point.)
 */
#include <wasi/api.h>

static const char message[] = "hello from spare\n";

void _start(void)
{
    __wasi_ciovec_t iov = { .buf = (const uint8_t *)message, .buf_len = sizeof message - 1 };
    __wasi_size_t written;
    /* A short write or error is ignored: there is nothing useful left to do. */
    (void)__wasi_fd_write(1, &iov, 1, &written);
}
