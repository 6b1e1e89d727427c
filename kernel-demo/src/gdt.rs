//! Per-CPU GDT and TSS, with interrupt stacks (IST) for double faults and NMIs.
//!
//! Every CPU gets its own GDT (kernel code, kernel data, its TSS) and TSS, in static slots indexed by its
//! dense CPU index, built and loaded by that CPU ([`init_cpu`]). The TSS's IST entries point at per-CPU
//! static stacks: a double fault (say, a kernel stack overflow) and an NMI (TLB shoot-down, which may
//! arrive anywhere, even at the first instruction of an interrupt handler) run on known-good stacks.
//! No heap is used.

use crate::smp::MAX_CPUS;
use core::cell::UnsafeCell;
use core::mem::MaybeUninit;
use x86_64::instructions::segmentation::{Segment, CS, DS, ES, SS};
use x86_64::instructions::tables::load_tss;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::tss::TaskStateSegment;
use x86_64::VirtAddr;

/// IST slot (0-based, as `set_stack_index` takes it) of the double-fault handler.
pub const DOUBLE_FAULT_IST: u16 = 0;
/// IST slot of the NMI handler.
pub const NMI_IST: u16 = 1;
/// Size of each IST stack.
pub const IST_STACK_SIZE: usize = 16 * 1024;

#[repr(C, align(16))]
struct IstStack([u8; IST_STACK_SIZE]);

/// Two IST stacks (double fault, NMI) per CPU index.
struct IstStacks(UnsafeCell<[[IstStack; 2]; MAX_CPUS]>);
// SAFETY: each CPU only ever uses the two stacks of its own index (through its TSS); the array is
// never read or written as Rust data.
unsafe impl Sync for IstStacks {}
static IST_STACKS: IstStacks =
    IstStacks(UnsafeCell::new([const { [IstStack([0; IST_STACK_SIZE]), IstStack([0; IST_STACK_SIZE])] }; MAX_CPUS]));

struct Tables {
    tss: TaskStateSegment,
    gdt: GlobalDescriptorTable,
}

struct TableSlots(UnsafeCell<[MaybeUninit<Tables>; MAX_CPUS]>);
// SAFETY: slot `i` is written once, by the CPU with index `i` in `init_cpu` before it loads the tables,
// and only read (by the hardware) after; CpuIndexMap hands each index to one CPU.
unsafe impl Sync for TableSlots {}
static TABLES: TableSlots = TableSlots(UnsafeCell::new([const { MaybeUninit::uninit() }; MAX_CPUS]));

/// The selectors every CPU's GDT has (the same layout everywhere).
#[derive(Debug, Clone, Copy)]
pub struct Selectors {
    /// 64-bit kernel code.
    pub code: SegmentSelector,
    /// Kernel data (loaded into SS, DS, ES).
    pub data: SegmentSelector,
    /// This CPU's TSS.
    pub tss: SegmentSelector,
}

/// Builds and loads the running CPU's GDT and TSS, in slot `index`, and reloads CS, SS, DS, ES and TR.
///
/// # Safety
/// `index < MAX_CPUS` is the running CPU's own dense index (from `percpu::CPU_MAP`), and this is the
/// only call for that index: the slot must not be in use by another CPU.
pub unsafe fn init_cpu(index: usize) -> Selectors {
    assert!(index < MAX_CPUS, "CPU index {index} out of range");
    let stacks = IST_STACKS.0.get().cast::<[IstStack; 2]>();
    // SAFETY: `index < MAX_CPUS`, so the pointer stays inside the static array; only addresses are taken.
    let (df_top, nmi_top) = unsafe {
        let mine = stacks.add(index);
        let df = core::ptr::addr_of_mut!((*mine)[0]) as u64 + IST_STACK_SIZE as u64;
        let nmi = core::ptr::addr_of_mut!((*mine)[1]) as u64 + IST_STACK_SIZE as u64;
        (df, nmi)
    };
    let mut tss = TaskStateSegment::new();
    tss.interrupt_stack_table[DOUBLE_FAULT_IST as usize] = VirtAddr::new(df_top);
    tss.interrupt_stack_table[NMI_IST as usize] = VirtAddr::new(nmi_top);

    // SAFETY: slot `index` belongs to this CPU alone (caller's contract) and is written before anything
    // references it; after this, it is only read. It lives in a static, so the references are 'static.
    let tables: &'static Tables = unsafe {
        let slot = TABLES.0.get().cast::<MaybeUninit<Tables>>().add(index);
        let t = (*slot).write(Tables { tss, gdt: GlobalDescriptorTable::new() });
        let tss_ref: &'static TaskStateSegment = &*core::ptr::addr_of!(t.tss);
        t.gdt.append(Descriptor::kernel_code_segment());
        t.gdt.append(Descriptor::kernel_data_segment());
        t.gdt.append(Descriptor::tss_segment(tss_ref));
        &*slot.cast::<Tables>()
    };
    tables.gdt.load();
    let sel = Selectors {
        code: SegmentSelector::new(1, x86_64::PrivilegeLevel::Ring0),
        data: SegmentSelector::new(2, x86_64::PrivilegeLevel::Ring0),
        tss: SegmentSelector::new(3, x86_64::PrivilegeLevel::Ring0),
    };
    // SAFETY: the GDT just loaded has a 64-bit code segment at index 1, a data segment at 2 and this
    // CPU's TSS (its stacks in statics) at 3; reloading the segment registers and TR with them keeps the
    // CPU running in the same flat address space.
    unsafe {
        CS::set_reg(sel.code);
        SS::set_reg(sel.data);
        DS::set_reg(sel.data);
        ES::set_reg(sel.data);
        load_tss(sel.tss);
    }
    sel
}
