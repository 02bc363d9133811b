"""Constants (and, for the real backend, struct layouts and ioctl numbers)
named exactly as in ``include/uapi/linux/kvm.h``.

The 2017 "fast write protect" series adds three names that never reached
mainline; they are kept here with the series' numbers and marked as such.
"""

import ctypes as _ct

# --- memslot flags -------------------------------------------------------
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1

# --- capabilities --------------------------------------------------------
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_DIRTY_LOG_RING = 192
KVM_CAP_DIRTY_LOG_RING_ACQ_REL = 223
KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP = 225
# 2017 series, never merged (PATCH 4/7 and 5/7 numbers).  Mainline reuses
# 145/146 for s390/PPC, so a real kernel answers 0 for them on x86.
KVM_CAP_X86_WRITE_PROTECT_ALL_MEM = 145
KVM_CAP_X86_DIRTY_LOG_WITHOUT_WRITE_PROTECT = 146

# --- KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 args[0] ---------------------------
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1
KVM_DIRTY_LOG_MANUAL_CAPS = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET

# --- KVM_GET_DIRTY_LOG flags (2017 series: padding1 became flags) --------
KVM_DIRTY_LOG_WITHOUT_WRITE_PROTECT = 0x1

# --- KVM_CLEAR_DIRTY_LOG alignment (kvm-all.c KVM_CLEAR_LOG_SHIFT) -------
KVM_CLEAR_LOG_SHIFT = 6
KVM_CLEAR_LOG_ALIGN = 1 << KVM_CLEAR_LOG_SHIFT  # pages

# --- dirty ring ----------------------------------------------------------
KVM_DIRTY_GFN_F_DIRTY = 1 << 0
KVM_DIRTY_GFN_F_RESET = 1 << 1
KVM_DIRTY_LOG_PAGE_OFFSET = 64

# --- exit reasons --------------------------------------------------------
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_DIRTY_RING_FULL = 31
KVM_EXIT_SYSTEM_EVENT = 24

# =========================================================================
# Real-KVM part: ioctl numbers and struct layouts (x86-64), from
# include/uapi/linux/kvm.h and arch/x86/include/uapi/asm/kvm.h.  Only the
# real backend (memory.kvm.real, memory.kvm.real.vcpu) uses what follows.
# =========================================================================


KVMIO = 0xAE
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _IOC(direction: int, nr: int, size: int) -> int:
    # asm-generic/ioctl.h: dir<<30 | size<<16 | type<<8 | nr
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _IO(nr: int) -> int:
    return _IOC(_IOC_NONE, nr, 0)


def _IOR(nr: int, size: int) -> int:
    return _IOC(_IOC_READ, nr, size)


def _IOW(nr: int, size: int) -> int:
    return _IOC(_IOC_WRITE, nr, size)


def _IOWR(nr: int, size: int) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, nr, size)


KVM_API_VERSION = 12

# --- more capabilities ---------------------------------------------------
KVM_CAP_USER_MEMORY = 3
KVM_CAP_NR_VCPUS = 9
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_GET_MSR_FEATURES = 153
KVM_CAP_BINARY_STATS_FD = 203

KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_HALTED = 3


# --- structs -------------------------------------------------------------
class kvm_userspace_memory_region(_ct.Structure):
    _fields_ = [
        ("slot", _ct.c_uint32),
        ("flags", _ct.c_uint32),
        ("guest_phys_addr", _ct.c_uint64),
        ("memory_size", _ct.c_uint64),
        ("userspace_addr", _ct.c_uint64),
    ]


class kvm_dirty_log(_ct.Structure):
    # The 2017 series renamed padding1 to flags; mainline keeps padding1.
    _fields_ = [("slot", _ct.c_uint32), ("padding1", _ct.c_uint32), ("dirty_bitmap", _ct.c_uint64)]


class kvm_clear_dirty_log(_ct.Structure):
    _fields_ = [
        ("slot", _ct.c_uint32),
        ("num_pages", _ct.c_uint32),
        ("first_page", _ct.c_uint64),
        ("dirty_bitmap", _ct.c_uint64),
    ]


class kvm_enable_cap(_ct.Structure):
    _fields_ = [
        ("cap", _ct.c_uint32),
        ("flags", _ct.c_uint32),
        ("args", _ct.c_uint64 * 4),
        ("pad", _ct.c_uint8 * 64),
    ]


class kvm_regs(_ct.Structure):
    _fields_ = [
        (name, _ct.c_uint64)
        for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags",
        )
    ]


class kvm_segment(_ct.Structure):
    _fields_ = [
        ("base", _ct.c_uint64),
        ("limit", _ct.c_uint32),
        ("selector", _ct.c_uint16),
        ("type", _ct.c_uint8),
        ("present", _ct.c_uint8),
        ("dpl", _ct.c_uint8),
        ("db", _ct.c_uint8),
        ("s", _ct.c_uint8),
        ("l", _ct.c_uint8),
        ("g", _ct.c_uint8),
        ("avl", _ct.c_uint8),
        ("unusable", _ct.c_uint8),
        ("padding", _ct.c_uint8),
    ]


class kvm_dtable(_ct.Structure):
    _fields_ = [("base", _ct.c_uint64), ("limit", _ct.c_uint16), ("padding", _ct.c_uint16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(_ct.Structure):
    _fields_ = [
        ("cs", kvm_segment), ("ds", kvm_segment), ("es", kvm_segment), ("fs", kvm_segment),
        ("gs", kvm_segment), ("ss", kvm_segment), ("tr", kvm_segment), ("ldt", kvm_segment),
        ("gdt", kvm_dtable), ("idt", kvm_dtable),
        ("cr0", _ct.c_uint64), ("cr2", _ct.c_uint64), ("cr3", _ct.c_uint64), ("cr4", _ct.c_uint64),
        ("cr8", _ct.c_uint64), ("efer", _ct.c_uint64), ("apic_base", _ct.c_uint64),
        ("interrupt_bitmap", _ct.c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_fpu(_ct.Structure):
    _fields_ = [
        ("fpr", (_ct.c_uint8 * 16) * 8),
        ("fcw", _ct.c_uint16), ("fsw", _ct.c_uint16), ("ftwx", _ct.c_uint8), ("pad1", _ct.c_uint8),
        ("last_opcode", _ct.c_uint16), ("last_ip", _ct.c_uint64), ("last_dp", _ct.c_uint64),
        ("xmm", (_ct.c_uint8 * 16) * 16),
        ("mxcsr", _ct.c_uint32), ("pad2", _ct.c_uint32),
    ]


class kvm_vcpu_events(_ct.Structure):
    # Kept opaque: the destination restores the 64 bytes as read.
    _fields_ = [("raw", _ct.c_uint8 * 64)]


class kvm_mp_state(_ct.Structure):
    _fields_ = [("mp_state", _ct.c_uint32)]


class kvm_msr_entry(_ct.Structure):
    _fields_ = [("index", _ct.c_uint32), ("reserved", _ct.c_uint32), ("data", _ct.c_uint64)]


class kvm_msrs_1(_ct.Structure):
    """``struct kvm_msrs`` with one entry (MSRs are moved one at a time)."""

    _fields_ = [("nmsrs", _ct.c_uint32), ("pad", _ct.c_uint32), ("entries", kvm_msr_entry * 1)]


class kvm_cpuid_entry2(_ct.Structure):
    _fields_ = [
        ("function", _ct.c_uint32), ("index", _ct.c_uint32), ("flags", _ct.c_uint32),
        ("eax", _ct.c_uint32), ("ebx", _ct.c_uint32), ("ecx", _ct.c_uint32), ("edx", _ct.c_uint32),
        ("padding", _ct.c_uint32 * 3),
    ]


KVM_CPUID2_HEADER_SIZE = 8  # struct kvm_cpuid2 {u32 nent; u32 padding; entries[]}
#: struct kvm_cpuid_entry2 {u32 function, index, flags, eax, ebx, ecx, edx, padding[3]}
KVM_CPUID_ENTRY2_DTYPE = [("function", "<u4"), ("index", "<u4"), ("flags", "<u4"), ("eax", "<u4"),
                          ("ebx", "<u4"), ("ecx", "<u4"), ("edx", "<u4"), ("padding", "<u4", (3,))]
KVM_MSR_LIST_HEADER_SIZE = 4  # struct kvm_msr_list {u32 nmsrs; u32 indices[]}

# struct kvm_dirty_gfn {u32 flags; u32 slot; u64 offset}, as a numpy dtype.
KVM_DIRTY_GFN_DTYPE = [("flags", "<u4"), ("slot", "<u4"), ("offset", "<u8")]
KVM_DIRTY_GFN_SIZE = 16

# struct kvm_run: offsets used by the vCPU loop.
KVM_RUN_REQUEST_INTERRUPT_WINDOW = 0
KVM_RUN_IMMEDIATE_EXIT = 1
KVM_RUN_EXIT_REASON = 8
KVM_RUN_IO_DIRECTION = 32  # u8: KVM_EXIT_IO_IN 0 / OUT 1
KVM_RUN_IO_SIZE = 33  # u8
KVM_RUN_IO_PORT = 34  # u16
KVM_RUN_IO_COUNT = 36  # u32
KVM_RUN_IO_DATA_OFFSET = 40  # u64
KVM_RUN_INTERNAL_SUBERROR = 32
KVM_RUN_FAIL_ENTRY_REASON = 32
KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

# Binary stats (Documentation/virt/kvm/api.rst, "KVM_GET_STATS_FD")
KVM_STATS_HEADER_SIZE = 24  # flags, name_size, num_desc, id_offset, desc_offset, data_offset
KVM_STATS_DESC_SIZE = 16  # flags u32, exponent s16, size u16, offset u32, bucket_size u32 (+name)

# --- ioctl numbers -------------------------------------------------------
# /dev/kvm
KVM_GET_API_VERSION = _IO(0x00)
KVM_CREATE_VM = _IO(0x01)
KVM_GET_MSR_INDEX_LIST = _IOWR(0x02, KVM_MSR_LIST_HEADER_SIZE)
KVM_CHECK_EXTENSION = _IO(0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(0x05, KVM_CPUID2_HEADER_SIZE)
# VM fd
KVM_CREATE_VCPU = _IO(0x41)
KVM_GET_DIRTY_LOG = _IOW(0x42, _ct.sizeof(kvm_dirty_log))
KVM_SET_USER_MEMORY_REGION = _IOW(0x46, _ct.sizeof(kvm_userspace_memory_region))
#: 2017 series (never merged): ``_IO(KVMIO, 0x49)``; real kernels answer ENOTTY.
KVM_WRITE_PROTECT_ALL_MEM = _IO(0x49)
KVM_ENABLE_CAP = _IOW(0xA3, _ct.sizeof(kvm_enable_cap))
KVM_CLEAR_DIRTY_LOG = _IOWR(0xC0, _ct.sizeof(kvm_clear_dirty_log))
KVM_RESET_DIRTY_RINGS = _IO(0xC7)
KVM_GET_STATS_FD = _IO(0xCE)
# vCPU fd
KVM_RUN = _IO(0x80)
KVM_GET_REGS = _IOR(0x81, _ct.sizeof(kvm_regs))
KVM_SET_REGS = _IOW(0x82, _ct.sizeof(kvm_regs))
KVM_GET_SREGS = _IOR(0x83, _ct.sizeof(kvm_sregs))
KVM_SET_SREGS = _IOW(0x84, _ct.sizeof(kvm_sregs))
KVM_GET_MSRS = _IOWR(0x88, 8)  # sizeof(struct kvm_msrs) header
KVM_SET_MSRS = _IOW(0x89, 8)
KVM_GET_FPU = _IOR(0x8C, _ct.sizeof(kvm_fpu))
KVM_SET_FPU = _IOW(0x8D, _ct.sizeof(kvm_fpu))
KVM_SET_CPUID2 = _IOW(0x90, KVM_CPUID2_HEADER_SIZE)
KVM_GET_CPUID2 = _IOWR(0x91, KVM_CPUID2_HEADER_SIZE)
KVM_GET_MP_STATE = _IOR(0x98, _ct.sizeof(kvm_mp_state))
KVM_SET_MP_STATE = _IOW(0x99, _ct.sizeof(kvm_mp_state))
KVM_GET_VCPU_EVENTS = _IOR(0x9F, _ct.sizeof(kvm_vcpu_events))
KVM_SET_VCPU_EVENTS = _IOW(0xA0, _ct.sizeof(kvm_vcpu_events))

# Sanity: the numbers measured on this host (reference/kvm.md).
assert KVM_GET_DIRTY_LOG == 0x4010AE42 and KVM_SET_USER_MEMORY_REGION == 0x4020AE46
assert KVM_ENABLE_CAP == 0x4068AEA3 and KVM_CLEAR_DIRTY_LOG == 0xC018AEC0
assert KVM_GET_SREGS == 0x8138AE83 and KVM_GET_FPU == 0x81A0AE8C and KVM_GET_VCPU_EVENTS == 0x8040AE9F
assert KVM_GET_SUPPORTED_CPUID == 0xC008AE05 and KVM_SET_CPUID2 == 0x4008AE90
assert KVM_GET_MSRS == 0xC008AE88 and KVM_SET_MSRS == 0x4008AE89 and KVM_GET_REGS == 0x8090AE81
