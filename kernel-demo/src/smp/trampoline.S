/* AP start-up trampoline (see smp.rs). Copied to physical 0x8000 (TRAMP) by the BSP; an AP starts here
 * in real mode after a SIPI with vector 0x08, switches to protected mode, then to long mode with the
 * BSP's page tables (CR3 from the data block; this page is identity-mapped meanwhile), takes its stack
 * from a table indexed by its APIC ID (CPUID leaf 1), and calls the Rust entry with the APIC ID in EDI.
 * Every address is TRAMP + (label - ap_trampoline_start): assembled as constants, no relocations. */
.set TRAMP, 0x8000
/* Fixed layout (offsets from the start; `.org` below): GDT at 0x200, its pointer at 0x220, data at 0x230.
 * Memory operands take plain numbers (the assembler refuses label differences there). */
.set TR_GDT_PTR, TRAMP + 0x220
.set TR_DATA, TRAMP + 0x230
.section .text.ap_trampoline, "ax"
.global ap_trampoline_start
.global ap_trampoline_data
.global ap_trampoline_end
.code16
ap_trampoline_start:
    cli
    cld
    xor ax, ax
    mov ds, ax
    mov es, ax
    mov ss, ax
    lgdt [TR_GDT_PTR]
    mov eax, cr0
    or eax, 1
    mov cr0, eax
    /* ljmp 0x08:pm32 (32-bit offset) */
    .byte 0x66, 0xea
    .long TRAMP + (tr_pm32 - ap_trampoline_start)
    .word 0x08
.code32
tr_pm32:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    /* CR4.PAE */
    mov eax, cr4
    or eax, 1 << 5
    mov cr4, eax
    mov eax, [TR_DATA]
    mov cr3, eax
    /* EFER: LME (bit 8), NXE (bit 11): the kernel's page tables use the no-execute bit */
    mov ecx, 0xC0000080
    rdmsr
    or eax, (1 << 8) | (1 << 11)
    wrmsr
    /* CR0: PG | WP | PE */
    mov eax, cr0
    or eax, 0x80010001
    mov cr0, eax
    /* ljmp 0x18:lm64 */
    .byte 0xea
    .long TRAMP + (tr_lm64 - ap_trampoline_start)
    .word 0x18
.code64
tr_lm64:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov eax, 1
    cpuid
    shr ebx, 24
    mov rax, [TR_DATA + 8]
    mov rsp, [rax + rbx * 8]
    test rsp, rsp
    jz 2f
    mov edi, ebx
    mov rax, [TR_DATA + 16]
    call rax
2:
    cli
    hlt
    jmp 2b
.org 0x200
tr_gdt:
    .quad 0
    .quad 0x00cf9a000000ffff /* 0x08: 32-bit code */
    .quad 0x00cf92000000ffff /* 0x10: data */
    .quad 0x00af9a000000ffff /* 0x18: 64-bit code */
tr_gdt_ptr:
    .word 4 * 8 - 1
    .long TRAMP + (tr_gdt - ap_trampoline_start)
.org 0x230
/* Filled by the BSP in the copy: CR3 (+0), stack-top table indexed by APIC ID (+8), Rust entry (+16). */
ap_trampoline_data:
    .quad 0
    .quad 0
    .quad 0
ap_trampoline_end:
.code64
.text
