//! The interrupt descriptor table, shared by all CPUs, and its handlers.
//!
//! Exceptions (page fault, general protection, double fault, invalid opcode, ...) panic with a message
//! saying what happened and where; the panic handler prints it on the serial console and ends the run
//! with failure. Breakpoints print and continue. NMIs (on their own IST stack) serve TLB shoot-downs
//! ([`crate::smp::tlb_shootdown`]). The local APIC's timer, fixed-IPI and spurious vectors are below
//! (see [`crate::apic`]). The legacy 8259 PICs are remapped to 0x20..0x2F and masked ([`disable_pic`]).
//!
//! Handlers use the `x86-interrupt` calling convention of the `x86_64` crate; none allocates.

use crate::gdt;
use core::cell::UnsafeCell;
use core::mem::MaybeUninit;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use x86_64::instructions::port::Port;
use x86_64::registers::control::Cr2;
use x86_64::structures::idt::{InterruptDescriptorTable, InterruptStackFrame, PageFaultErrorCode};

/// Vector of the LAPIC timer.
pub const TIMER_VECTOR: u8 = 0x40;
/// Vector of the fixed test IPI ([`crate::apic::send_fixed`]); its handler counts per CPU.
pub const FIXED_IPI_VECTOR: u8 = 0x41;
/// Vector of the LAPIC's spurious interrupts (its low four bits must be 1s on old APICs).
pub const SPURIOUS_VECTOR: u8 = 0xFF;
/// Where the 8259 PICs are remapped to (then masked): their spurious IRQs 7/15 land in 0x27/0x2F.
pub const PIC_BASE: u8 = 0x20;

/// Breakpoints seen (all CPUs).
pub static BREAKPOINTS: AtomicU64 = AtomicU64::new(0);

struct IdtCell(UnsafeCell<MaybeUninit<InterruptDescriptorTable>>);
// SAFETY: written once by `init` (the first caller, per STARTED) and published through READY (Release);
// `load` reads it only after seeing READY (Acquire), and it is never written again.
unsafe impl Sync for IdtCell {}
static IDT: IdtCell = IdtCell(UnsafeCell::new(MaybeUninit::uninit()));
static STARTED: AtomicBool = AtomicBool::new(false);
static READY: AtomicBool = AtomicBool::new(false);

/// Builds the IDT (once; later calls do nothing). Call on the BSP before [`load`] on any CPU.
pub fn init() {
    if STARTED.swap(true, Ordering::AcqRel) {
        return;
    }
    let mut idt = InterruptDescriptorTable::new();
    idt.divide_error.set_handler_fn(divide_error);
    idt.breakpoint.set_handler_fn(breakpoint);
    idt.invalid_opcode.set_handler_fn(invalid_opcode);
    idt.segment_not_present.set_handler_fn(segment_not_present);
    idt.stack_segment_fault.set_handler_fn(stack_segment_fault);
    idt.general_protection_fault.set_handler_fn(general_protection);
    idt.page_fault.set_handler_fn(page_fault);
    // SAFETY: the IST slots are set in every CPU's TSS by `gdt::init_cpu` to per-CPU static stacks that
    // nothing else uses.
    unsafe {
        idt.double_fault.set_handler_fn(double_fault).set_stack_index(gdt::DOUBLE_FAULT_IST);
        idt.non_maskable_interrupt.set_handler_fn(nmi).set_stack_index(gdt::NMI_IST);
    }
    idt[TIMER_VECTOR].set_handler_fn(timer);
    idt[FIXED_IPI_VECTOR].set_handler_fn(fixed_ipi);
    idt[SPURIOUS_VECTOR].set_handler_fn(spurious);
    for v in PIC_BASE..PIC_BASE + 16 {
        idt[v].set_handler_fn(pic_spurious);
    }
    // SAFETY: STARTED was false, so this is the only write; no CPU reads the table before READY is set.
    unsafe { (*IDT.0.get()).write(idt) };
    READY.store(true, Ordering::Release);
}

/// Loads the IDT on the running CPU. Panics if [`init`] has not run.
pub fn load() {
    assert!(READY.load(Ordering::Acquire), "idt::load before idt::init");
    // SAFETY: READY means `init` wrote the table, which is never written again; it is a static.
    let idt: &'static InterruptDescriptorTable = unsafe { (*IDT.0.get()).assume_init_ref() };
    idt.load();
}

/// Remaps the legacy 8259 PICs to [`PIC_BASE`] and masks all their lines: the kernel uses the local
/// APIC only, and a firmware-programmed PIC must not fire into exception vectors.
pub fn disable_pic() {
    let outb = |port: u16, v: u8| {
        // SAFETY: ports 0x20/0x21/0xA0/0xA1 are the 8259 PICs, which nothing else in the kernel drives;
        // the ICW1-4 sequence and the mask writes only affect interrupt delivery from them.
        unsafe { Port::<u8>::new(port).write(v) }
    };
    outb(0x20, 0x11); // ICW1: init, ICW4 follows
    outb(0xA0, 0x11);
    outb(0x21, PIC_BASE); // ICW2: vector base
    outb(0xA1, PIC_BASE + 8);
    outb(0x21, 0x04); // ICW3: slave on IRQ2
    outb(0xA1, 0x02);
    outb(0x21, 0x01); // ICW4: 8086 mode
    outb(0xA1, 0x01);
    outb(0x21, 0xFF); // mask everything
    outb(0xA1, 0xFF);
}

extern "x86-interrupt" fn divide_error(frame: InterruptStackFrame) {
    panic!("EXCEPTION: divide error at RIP {:#x}", frame.instruction_pointer.as_u64());
}

extern "x86-interrupt" fn breakpoint(frame: InterruptStackFrame) {
    BREAKPOINTS.fetch_add(1, Ordering::Relaxed);
    crate::serial_println!("EXCEPTION: breakpoint at RIP {:#x} (continuing)", frame.instruction_pointer.as_u64());
}

extern "x86-interrupt" fn invalid_opcode(frame: InterruptStackFrame) {
    panic!("EXCEPTION: invalid opcode at RIP {:#x}", frame.instruction_pointer.as_u64());
}

// Handlers of exceptions that push an error code start with RSP 8 bytes off the 16-byte alignment the
// SysV ABI promises callees (LLVM's `x86-interrupt` lowering, seen with rustc 1.96: 16-aligned locals of
// callees end up misaligned, and debug builds trap on the alignment checks of `ptr::read`). These
// handlers all panic, so they gather what they report and call the reporting function through
// [`call_aligned`], which realigns the stack first and never returns.

/// Calls `f(a, b, c)` with RSP 16-byte aligned at the call; never returns.
///
/// # Safety
/// Only for diverging exception paths: the stack pointer is rounded down in place (the interrupted
/// context is abandoned).
unsafe fn call_aligned(f: extern "C" fn(u64, u64, u64) -> !, a: u64, b: u64, c: u64) -> ! {
    // SAFETY: rounding RSP down stays inside the current (IST or kernel) stack and only skips bytes
    // below the live frame; `f` diverges, so nothing uses the old frame again.
    unsafe {
        core::arch::asm!(
            "and rsp, -16",
            "call {f}",
            "ud2",
            f = in(reg) f,
            in("rdi") a,
            in("rsi") b,
            in("rdx") c,
            options(noreturn)
        )
    }
}

extern "x86-interrupt" fn segment_not_present(frame: InterruptStackFrame, code: u64) {
    extern "C" fn report(code: u64, rip: u64, _: u64) -> ! {
        panic!("EXCEPTION: segment not present (error code {code:#x}) at RIP {rip:#x}");
    }
    // SAFETY: `report` diverges (see `call_aligned`).
    unsafe { call_aligned(report, code, frame.instruction_pointer.as_u64(), 0) }
}

extern "x86-interrupt" fn stack_segment_fault(frame: InterruptStackFrame, code: u64) {
    extern "C" fn report(code: u64, rip: u64, _: u64) -> ! {
        panic!("EXCEPTION: stack-segment fault (error code {code:#x}) at RIP {rip:#x}");
    }
    // SAFETY: `report` diverges (see `call_aligned`).
    unsafe { call_aligned(report, code, frame.instruction_pointer.as_u64(), 0) }
}

extern "x86-interrupt" fn general_protection(frame: InterruptStackFrame, code: u64) {
    extern "C" fn report(code: u64, rip: u64, rsp: u64) -> ! {
        panic!(
            "EXCEPTION: general protection fault (error code {code:#x}{}) at RIP {rip:#x}, RSP {rsp:#x}",
            if code != 0 { ": segment selector related" } else { "" },
        );
    }
    // SAFETY: `report` diverges (see `call_aligned`).
    unsafe { call_aligned(report, code, frame.instruction_pointer.as_u64(), frame.stack_pointer.as_u64()) }
}

extern "x86-interrupt" fn page_fault(frame: InterruptStackFrame, code: PageFaultErrorCode) {
    extern "C" fn report(addr: u64, code: u64, rip: u64) -> ! {
        let code = PageFaultErrorCode::from_bits_truncate(code);
        let access = if code.contains(PageFaultErrorCode::INSTRUCTION_FETCH) {
            "instruction fetch"
        } else if code.contains(PageFaultErrorCode::CAUSED_BY_WRITE) {
            "write"
        } else {
            "read"
        };
        panic!(
            "EXCEPTION: page fault at address {addr:#x}: {access}, {} mode, {} (error code {:#x}{}) at RIP {rip:#x}",
            if code.contains(PageFaultErrorCode::USER_MODE) { "user" } else { "kernel" },
            if code.contains(PageFaultErrorCode::PROTECTION_VIOLATION) {
                "page present (protection violation)"
            } else {
                "page not present"
            },
            code.bits(),
            if code.contains(PageFaultErrorCode::MALFORMED_TABLE) { ", reserved bit set in a page table" } else { "" },
        );
    }
    // SAFETY: `report` diverges (see `call_aligned`).
    unsafe { call_aligned(report, Cr2::read_raw(), code.bits(), frame.instruction_pointer.as_u64()) }
}

extern "x86-interrupt" fn double_fault(frame: InterruptStackFrame, code: u64) -> ! {
    extern "C" fn report(code: u64, rip: u64, rsp: u64) -> ! {
        panic!(
            "EXCEPTION: double fault (error code {code:#x}) at RIP {rip:#x}, RSP {rsp:#x} (a kernel stack overflow?)"
        );
    }
    // SAFETY: `report` diverges (see `call_aligned`).
    unsafe { call_aligned(report, code, frame.instruction_pointer.as_u64(), frame.stack_pointer.as_u64()) }
}

extern "x86-interrupt" fn nmi(_frame: InterruptStackFrame) {
    crate::smp::handle_nmi();
}

extern "x86-interrupt" fn timer(_frame: InterruptStackFrame) {
    crate::apic::timer_interrupt();
}

extern "x86-interrupt" fn fixed_ipi(_frame: InterruptStackFrame) {
    crate::apic::fixed_ipi_interrupt();
}

extern "x86-interrupt" fn spurious(_frame: InterruptStackFrame) {
    // A spurious LAPIC interrupt takes no EOI.
}

extern "x86-interrupt" fn pic_spurious(_frame: InterruptStackFrame) {
    // The PICs are masked; what still arrives is their spurious IRQ 7/15, which takes no EOI.
}
