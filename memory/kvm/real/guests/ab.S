# "ab": the behaviour of QEMU's migration test guest
# (tests/qtest/migration/i386/a-b-bootblock.S), as a 64-bit CPL3 loop.
#
#   1. print 'A' once on COM1;
#   2. zero byte 0 of every 4 KiB page in [CTRL_START, CTRL_END);
#   3. forever: increment byte 0 of every page in ascending order, count
#      the pass in CTRL_PASS, print 'B' every 64 passes.
#
# So every page holds v, except pages not yet reached in the current pass,
# which hold v-1: the invariant check_guests_ram() verifies.  Between two
# passes, if CTRL_HALT_REQ is nonzero the guest executes hlt (a #GP at CPL3
# which the CPL0 stub turns into KVM_EXIT_HLT).
#
# Loaded at CODE_GPA; entered at CPL3 with everything set by KVM_SET_SREGS.
    .intel_syntax noprefix
    .code64
    .include "layout.inc"
    .text
entry:
    mov dx, PORT_SERIAL
    mov al, 'A'
    out dx, al
    mov rdi, [CTRL_START]
    mov rsi, [CTRL_STRIDE]
    mov r8, [CTRL_END]
zero:
    mov byte ptr [rdi], 0
    add rdi, rsi
    cmp rdi, r8
    jb zero
    mov rbx, [CTRL_PASS]         # 0 on a fresh start
outer:
    mov rdi, [CTRL_START]
inner:
    inc byte ptr [rdi]
    add rdi, rsi
    cmp rdi, r8
    jb inner
    inc rbx
    mov [CTRL_PASS], rbx
    test bl, 63
    jnz 1f
    mov dx, PORT_SERIAL
    mov al, 'B'
    out dx, al
1:  cmp qword ptr [CTRL_HALT_REQ], 0
    je outer
    hlt                          # #GP -> CPL0 stub -> KVM_EXIT_HLT
    jmp outer

    .include "common.inc"
