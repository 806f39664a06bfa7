/* memory benchmark guest: writes one byte to each of PAGES 4 KiB pages from 16 MiB up, then halts
   with interrupts off forever (the vCPU sleeps in the host kernel, no CPU burnt), so the VMM can be
   sampled from /proc. Encodings are identical in 32-bit (PVH) and 64-bit mode. */
#ifndef PAGES
#define PAGES 4096
#endif
#include "pvhnote.inc"
        .text
        .globl _start
_start:
        .byte 0xfa                              /* cli */
        .byte 0xb8; .long 0x1000000             /* mov eax, 16 MiB */
1:      .byte 0xc6, 0x00, 0x01                  /* mov byte [eax/rax], 1 */
        .byte 0x05; .long 0x1000                /* add eax, 4096 */
        .byte 0x3d; .long 0x1000000 + PAGES * 4096 /* cmp eax, end */
        .byte 0x72, 1b - 2f                     /* jb 1b */
2:
3:      .byte 0xf4                              /* hlt */
        .byte 0xeb, 3b - 4f                     /* jmp 3b */
4:
