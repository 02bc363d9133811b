# "ab": the behaviour of QEMU's migration test guest
# (tests/qtest/migration/i386/a-b-bootblock.S), as a 64-bit CPL3 loop,
# run by every vCPU on its own share of the data range.
#
# r15 = this vCPU's control slot (VCPU_CTRL_GPA + VCPU_CTRL_SIZE * index,
# set by the host at entry).  The host splits [CTRL_START, CTRL_END) into
# one contiguous share per vCPU, [VC_START, VC_END) of its slot.  Each vCPU:
#
#   1. vCPU 0 prints 'A' once on COM1;
#   2. zero byte 0 of every 4 KiB page of its share;
#   3. forever: increment byte 0 of every page of its share in ascending
#      order; count the pass in VC_PASS and (lock inc) in CTRL_PASS; vCPU 0
#      prints 'B' every 64 of its passes.
#
# Page writes are counted per pass, not per page, so the page loop stays the
# four instructions of QEMU's guest: r14 += pages of the share (r9) at the end of
# the zeroing pass and of every pass, published in VC_WRITES, so VC_WRITES =
# share * (VC_PASS + 1) at a boundary; the host adds the pages of the pass
# in progress from RAM (memory.kvm.guests.ab_pages_written).
#
# So within each share every page holds v, except pages not yet reached in
# the current pass, which hold v-1: the invariant check_guests_ram()
# verifies, share by share (two shares are at different passes).  Between
# two passes, if CTRL_HALT_REQ is nonzero the vCPU executes hlt (a #GP at
# CPL3 which the CPL0 stub turns into KVM_EXIT_HLT).
#
# Loaded at CODE_GPA; entered at CPL3 with everything set by KVM_SET_SREGS.
    .intel_syntax noprefix
    .code64
    .include "layout.inc"
    .text
entry:
    cmp qword ptr [r15 + VC_INDEX], 0
    jne 1f
    mov dx, PORT_SERIAL
    mov al, 'A'
    out dx, al
1:  mov rdi, [r15 + VC_START]
    mov rsi, [CTRL_STRIDE]
    mov r8, [r15 + VC_END]
    lea rax, [r8 + rsi - 1]      # r9 = pages written per pass: ceil((end - start) / stride)
    sub rax, rdi
    xor edx, edx
    div rsi
    mov r9, rax
    mov r14, [r15 + VC_WRITES]   # 0 on a fresh start
zero:
    mov byte ptr [rdi], 0
    add rdi, rsi
    cmp rdi, r8
    jb zero
    add r14, r9
    mov [r15 + VC_WRITES], r14
    mov rbx, [r15 + VC_PASS]     # 0 on a fresh start
outer:
    mov rdi, [r15 + VC_START]
inner:
    inc byte ptr [rdi]
    add rdi, rsi
    cmp rdi, r8
    jb inner
    inc rbx
    add r14, r9
    mov [r15 + VC_WRITES], r14
    mov [r15 + VC_PASS], rbx
    lock inc qword ptr [CTRL_PASS]
    test bl, 63
    jnz 1f
    cmp qword ptr [r15 + VC_INDEX], 0
    jne 1f
    mov dx, PORT_SERIAL
    mov al, 'B'
    out dx, al
1:  cmp qword ptr [CTRL_HALT_REQ], 0
    je outer
    hlt                          # #GP -> CPL0 stub -> KVM_EXIT_HLT
    jmp outer

    .include "common.inc"
