"""QEMU's memory API in Python: RAM blocks, regions, flat views, listeners,
dirty-memory clients, and KVM behind one small interface (``memory.kvm``)."""

from ._ramblock import RAMBlock, RAMList, TARGET_PAGE_BITS, TARGET_PAGE_SIZE
from ._dirty import (
    DIRTY_CLIENTS_ALL,
    DIRTY_CLIENTS_NOCODE,
    DIRTY_MEMORY_CODE,
    DIRTY_MEMORY_MIGRATION,
    DIRTY_MEMORY_NUM,
    DIRTY_MEMORY_VGA,
    GLOBAL_DIRTY_DIRTY_RATE,
    GLOBAL_DIRTY_LIMIT,
    GLOBAL_DIRTY_MASK,
    GLOBAL_DIRTY_MIGRATION,
    DirtyBitmapSnapshot,
    DirtyMemory,
    popcount,
)
from ._cost import DIRTY_LOG_CAUSES, NO_METER, SYNC_CAUSES, Cause, CostMeter, NullMeter
from ._errors import KVMListenerError, MemoryAPIError, MemoryRegionError
from ._listener import MemoryListener
from ._region import AddressSpace, FlatRange, FlatView, MemoryRegion, MemoryRegionSection
from ._system import MemorySystem, WriteProtectAllFn

__all__ = [
    "RAMBlock",
    "RAMList",
    "TARGET_PAGE_BITS",
    "TARGET_PAGE_SIZE",
    # dirty-memory clients
    "DIRTY_CLIENTS_ALL",
    "DIRTY_CLIENTS_NOCODE",
    "DIRTY_MEMORY_CODE",
    "DIRTY_MEMORY_MIGRATION",
    "DIRTY_MEMORY_NUM",
    "DIRTY_MEMORY_VGA",
    "GLOBAL_DIRTY_DIRTY_RATE",
    "GLOBAL_DIRTY_LIMIT",
    "GLOBAL_DIRTY_MASK",
    "GLOBAL_DIRTY_MIGRATION",
    "DirtyBitmapSnapshot",
    "DirtyMemory",
    "popcount",
    # memory API
    "AddressSpace",
    "FlatRange",
    "FlatView",
    "MemoryListener",
    "MemoryRegion",
    "MemoryRegionSection",
    "MemorySystem",
    "WriteProtectAllFn",
    # cost accounting hooks
    "Cause",
    "CostMeter",
    "DIRTY_LOG_CAUSES",
    "SYNC_CAUSES",
    "NO_METER",
    "NullMeter",
    # errors
    "KVMListenerError",
    "MemoryAPIError",
    "MemoryRegionError",
]
