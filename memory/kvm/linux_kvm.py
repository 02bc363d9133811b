"""Constants (and, for the real backend, struct layouts and ioctl numbers)
named exactly as in ``include/uapi/linux/kvm.h``.

The 2017 "fast write protect" series adds three names that never reached
mainline; they are kept here with the series' numbers and marked as such.
"""

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
