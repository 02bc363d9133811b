"""QEMU's memory API in Python: RAM blocks, regions, flat views, listeners,
dirty-memory clients, and KVM behind one small interface (``memory.kvm``)."""

from ._ramblock import RAMBlock, RAMList, TARGET_PAGE_BITS, TARGET_PAGE_SIZE

__all__ = ["RAMBlock", "RAMList", "TARGET_PAGE_BITS", "TARGET_PAGE_SIZE"]
