/* startup benchmark guest: the first instructions write 0 to QEMU's isa-debug-exit port 0xf4, which
   ends the VMM process with exit code (0<<1)|1 = 1. The encodings are the same in 32-bit protected
   mode (PVH entry) and 64-bit mode (KvmSharp's ELF entry), and the code is position independent. */
#include "pvhnote.inc"
        .text
        .globl _start
_start:
        .byte 0x66, 0xba, 0xf4, 0x00    /* mov dx, 0xf4 */
        .byte 0xb0, 0x00                /* mov al, 0 */
        .byte 0xee                      /* out dx, al */
1:      .byte 0xf4                      /* hlt */
        .byte 0xeb, 0xfd                /* jmp 1b */
