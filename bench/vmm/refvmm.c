/* refvmm: the smallest KVM VMM that runs the bench/vmm guests — the "limit" KvmSharp is compared
 * against. open /dev/kvm, create a VM, one anonymous memory slot, load the ELF's PT_LOAD segments at
 * p_paddr, one vCPU, set registers, KVM_RUN until the guest writes the isa-debug-exit port 0xf4, then
 * exit with (value << 1) | 1 like QEMU's isa-debug-exit and KvmSharp's --debug-exit. Port 0x80 (and any
 * other port) is ignored. No irqchip, no PIT, no devices.
 *
 *   refvmm [-m MiB] [-p] [-v] [-s] [-i] guest.elf
 *     -p   enter at the PVH note's entry: 32-bit protected mode, paging off (what QEMU and
 *          `kvmsharp run --pvh` do); default: 64-bit long mode at e_entry with exactly KvmSharp's boot
 *          state (GDT at 0x500 with CS 0x10 / DS 0x18 / TR 0x20, identity map of 4 GiB with 2 MiB pages
 *          at 0x9000.., CR0 = PE|ET|NE|PG, CR4 = PAE, EFER = LME|LMA, RSP 0x8ff0, RSI 0x7000) and the
 *          host's supported CPUID (KVM refuses EFER.LME without CPUID.LM).
 *     -v   print the number of exits and the time spent in the KVM_RUN loop to stderr.
 *     -i   also create the in-kernel irqchip and PIT (KVM_CREATE_IRQCHIP, KVM_CREATE_PIT2), as KvmSharp and
 *          QEMU do — to see what they cost at start-up and tear-down.
 *     -s   on HLT, stay alive (sleep until killed) instead of exiting with 0 — for the memory benchmark.
 */
#include <elf.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what) { perror(what); exit(2); }

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + ts.tv_nsec;
}

static struct kvm_segment seg(uint16_t sel, uint8_t type, uint8_t s, uint8_t db, uint8_t l, uint32_t limit, uint8_t g)
{
    struct kvm_segment r = { .base = 0, .limit = limit, .selector = sel, .type = type, .present = 1,
                             .dpl = 0, .db = db, .s = s, .l = l, .g = g };
    return r;
}

int main(int argc, char **argv)
{
    uint64_t mem_mib = 128;
    int pvh = 0, verbose = 0, stay = 0, irqchip = 0, opt;
    while ((opt = getopt(argc, argv, "m:pvsi")) != -1) {
        switch (opt) {
        case 'm': mem_mib = strtoull(optarg, NULL, 0); break;
        case 'p': pvh = 1; break;
        case 'v': verbose = 1; break;
        case 's': stay = 1; break;
        case 'i': irqchip = 1; break;
        default: fprintf(stderr, "usage: %s [-m MiB] [-p] [-v] [-s] [-i] guest.elf\n", argv[0]); return 2;
        }
    }
    if (optind != argc - 1) { fprintf(stderr, "usage: %s [-m MiB] [-p] [-v] [-s] [-i] guest.elf\n", argv[0]); return 2; }

    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) die("/dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) die("KVM_CREATE_VM");

    uint64_t mem_size = mem_mib << 20;
    uint8_t *mem = mmap(NULL, mem_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) die("mmap guest memory");
    struct kvm_userspace_memory_region region = { .slot = 0, .guest_phys_addr = 0, .memory_size = mem_size,
                                                  .userspace_addr = (uint64_t)mem };
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("KVM_SET_USER_MEMORY_REGION");

    if (irqchip) {
        struct kvm_pit_config pit = { .flags = KVM_PIT_SPEAKER_DUMMY };
        if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0) die("KVM_CREATE_IRQCHIP");
        if (ioctl(vm, KVM_CREATE_PIT2, &pit) < 0) die("KVM_CREATE_PIT2");
    }

    /* The ELF: PT_LOAD segments at p_paddr, PVH entry from the PT_NOTE segment. */
    int fd = open(argv[optind], O_RDONLY | O_CLOEXEC);
    if (fd < 0) die(argv[optind]);
    struct stat st;
    if (fstat(fd, &st) < 0) die("fstat");
    uint8_t *elf = mmap(NULL, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (elf == MAP_FAILED) die("mmap kernel");
    Elf64_Ehdr *eh = (Elf64_Ehdr *)elf;
    if (st.st_size < (off_t)sizeof *eh || memcmp(eh->e_ident, ELFMAG, SELFMAG) || eh->e_ident[EI_CLASS] != ELFCLASS64) {
        fprintf(stderr, "%s: not an ELF64 file\n", argv[optind]);
        return 2;
    }
    uint64_t entry = eh->e_entry, pvh_entry = 0;
    for (int i = 0; i < eh->e_phnum; i++) {
        Elf64_Phdr *ph = (Elf64_Phdr *)(elf + eh->e_phoff + (uint64_t)i * eh->e_phentsize);
        if (ph->p_type == PT_LOAD) {
            if (ph->p_paddr + ph->p_memsz > mem_size) { fprintf(stderr, "segment outside memory\n"); return 2; }
            memcpy(mem + ph->p_paddr, elf + ph->p_offset, ph->p_filesz);
        } else if (ph->p_type == PT_NOTE) {
            uint64_t pos = 0;
            while (pos + 12 <= ph->p_filesz) {
                uint32_t *n = (uint32_t *)(elf + ph->p_offset + pos);
                uint64_t name = (n[0] + 3) & ~3u, desc = (n[1] + 3) & ~3u;
                if (n[2] == 18 && n[0] >= 3 && !memcmp(n + 3, "Xen", 3))
                    pvh_entry = *(uint32_t *)((uint8_t *)(n + 3) + name);
                pos += 12 + name + desc;
            }
        }
    }
    if (pvh && !pvh_entry) { fprintf(stderr, "no PVH note\n"); return 2; }

    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0) die("KVM_CREATE_VCPU");
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (run_size < 0) die("KVM_GET_VCPU_MMAP_SIZE");
    struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED) die("mmap kvm_run");

    struct kvm_sregs sregs;
    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0) die("KVM_GET_SREGS");
    struct kvm_regs regs = { .rflags = 2, .rsp = 0x8ff0 };
    if (pvh) {
        uint64_t *gdt = (uint64_t *)(mem + 0x500);
        gdt[0] = 0; gdt[1] = 0x00cf9b000000ffffull; gdt[2] = 0x00cf93000000ffffull; gdt[3] = 0x00008b0000000067ull;
        sregs.cs = seg(0x08, 11, 1, 1, 0, 0xffffffff, 1);
        sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = seg(0x10, 3, 1, 1, 0, 0xffffffff, 1);
        sregs.tr = seg(0x18, 11, 0, 0, 0, 0x67, 0);
        sregs.gdt.base = 0x500; sregs.gdt.limit = 4 * 8 - 1;
        sregs.cr0 = 0x31; /* PE | ET | NE */
        sregs.cr3 = 0; sregs.cr4 = 0; sregs.efer = 0;
        regs.rip = pvh_entry;
        regs.rbx = 0x6000; /* hvm_start_info would be here; the bench guests do not read it */
    } else {
        /* CPUID first: KVM refuses EFER.LME unless the guest's CPUID has LM. */
        int n = 256;
        struct kvm_cpuid2 *cpuid = calloc(1, sizeof *cpuid + n * sizeof(struct kvm_cpuid_entry2));
        cpuid->nent = n;
        if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid) < 0) die("KVM_GET_SUPPORTED_CPUID");
        if (ioctl(vcpu, KVM_SET_CPUID2, cpuid) < 0) die("KVM_SET_CPUID2");
        uint64_t *gdt = (uint64_t *)(mem + 0x500);
        gdt[0] = 0; gdt[1] = 0x00cf9b000000ffffull; gdt[2] = 0x00af9b000000ffffull;
        gdt[3] = 0x00cf93000000ffffull; gdt[4] = 0x00008b0000000067ull; gdt[5] = 0;
        uint64_t *pml4 = (uint64_t *)(mem + 0x9000), *pdpt = (uint64_t *)(mem + 0xa000), *pd = (uint64_t *)(mem + 0xb000);
        pml4[0] = 0xa000 | 3;
        for (int i = 0; i < 4; i++) {
            pdpt[i] = (0xb000 + i * 0x1000) | 3;
            for (int j = 0; j < 512; j++)
                pd[i * 512 + j] = ((uint64_t)(i * 512 + j) << 21) | 0x83;
        }
        sregs.cs = seg(0x10, 11, 1, 0, 1, 0xffffffff, 1);
        sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = seg(0x18, 3, 1, 1, 0, 0xffffffff, 1);
        sregs.tr = seg(0x20, 11, 0, 0, 0, 0x67, 0);
        sregs.gdt.base = 0x500; sregs.gdt.limit = 6 * 8 - 1;
        sregs.idt.base = 0; sregs.idt.limit = 0;
        sregs.cr0 = 0x80000031; /* PG | NE | ET | PE */
        sregs.cr3 = 0x9000; sregs.cr4 = 0x20; sregs.efer = 0x500; /* LMA | LME */
        regs.rip = entry;
        regs.rsi = 0x7000;
    }
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0) die("KVM_SET_SREGS");
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");

    uint64_t exits = 0, t0 = now_ns();
    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) die("KVM_RUN");
        exits++;
        switch (run->exit_reason) {
        case KVM_EXIT_IO:
            if (run->io.direction == KVM_EXIT_IO_OUT && run->io.port == 0xf4) {
                uint8_t v = *((uint8_t *)run + run->io.data_offset);
                if (verbose) {
                    struct kvm_sregs s;
                    ioctl(vcpu, KVM_GET_SREGS, &s);
                    fprintf(stderr, "refvmm: %llu exits in %.3f ms (%.3f us/exit); at the exit CS=%#x (CPL %d)\n",
                            (unsigned long long)exits, (now_ns() - t0) / 1e6, (now_ns() - t0) / 1e3 / exits,
                            s.cs.selector, s.cs.selector & 3);
                }
                exit((v << 1) | 1);
            }
            break; /* port 0x80 and anything else: ignored */
        case KVM_EXIT_HLT:
            if (stay)
                for (;;)
                    pause();
            return 0;
        case KVM_EXIT_INTR:
            break;
        default:
            fprintf(stderr, "refvmm: exit reason %u (hw %llx, internal suberror %u)\n", run->exit_reason,
                    (unsigned long long)run->fail_entry.hardware_entry_failure_reason, run->internal.suberror);
            return 2;
        }
    }
}
