/* per-exit benchmark guest. Entered in 64-bit long mode at the ELF entry (KvmSharp's ELF boot;
   bench/vmm/refvmm.c sets up the same state). Ring 0 part (emulated by the host on PVM, short):
   own page tables (identity map of the first 4 MiB with 2 MiB pages, U/S set), own GDT with ring-3
   code/data descriptors, iretq to CPL 3 with IOPL = 3. Ring 3 part: COUNT writes to port 0x80 (each
   one a KVM_EXIT_IO that the VMM ignores), then a write of 0 to port 0xf4 (isa-debug-exit: exit 1). */
#ifndef COUNT
#define COUNT 100000
#endif
#include "pvhnote.inc"
        .intel_syntax noprefix
        .text
        .code64
        .globl _start
_start:
        cli
        lea rsp, [rip + kstack_top]
        lea rax, [rip + pml4]
        mov cr3, rax
        lgdt [rip + gdt_ptr]
        push 0x23                       /* SS: user data (GDT[4], RPL 3) */
        lea rax, [rip + ustack_top]
        push rax                        /* RSP */
        push 0x3002                     /* RFLAGS: IOPL = 3, IF = 0 */
        push 0x2b                       /* CS: user code64 (GDT[5], RPL 3) */
        lea rax, [rip + user]
        push rax                        /* RIP */
        iretq

user:                                   /* CPL 3 from here */
        mov ecx, COUNT
        mov dx, 0x80
        xor eax, eax
        test ecx, ecx
        jz 2f
1:      out dx, al
        dec ecx
        jnz 1b
2:      mov dx, 0xf4
        xor eax, eax
        out dx, al
3:      pause
        jmp 3b

        .data
        .p2align 12
pml4:   .quad pdpt + 0x7                /* P | RW | US */
        .fill 511, 8, 0
pdpt:   .quad pd + 0x7
        .fill 511, 8, 0
pd:     .quad 0x000000 + 0x87           /* 2 MiB page: P | RW | US | PS */
        .quad 0x200000 + 0x87
        .fill 510, 8, 0
        .p2align 3
gdt:    .quad 0                         /* 0x00 */
        .quad 0x00cf9b000000ffff        /* 0x08 code32, DPL 0 */
        .quad 0x00af9b000000ffff        /* 0x10 code64, DPL 0 (KvmSharp's boot CS) */
        .quad 0x00cf93000000ffff        /* 0x18 data, DPL 0 */
        .quad 0x00cff3000000ffff        /* 0x20 data, DPL 3 */
        .quad 0x00affb000000ffff        /* 0x28 code64, DPL 3 */
gdt_end:
gdt_ptr: .word gdt_end - gdt - 1
        .quad gdt
        .p2align 12
        .fill 4096, 1, 0
kstack_top:
        .fill 4096, 1, 0
ustack_top:
