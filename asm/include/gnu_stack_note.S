/* Mark the object's stack as non-executable; without this note the linker assumes an
 * executable stack for the whole program. */
#if defined(__linux__) && defined(__ELF__)
    .section .note.GNU-stack, "", @progbits
#endif
