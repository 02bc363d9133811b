# "pages": write exactly the pages the host lists, then halt.
#
# The host puts CTRL_LIST_COUNT guest-physical addresses (u64) at LIST_GPA;
# the guest increments the byte at each address in list order, counts the
# round in CTRL_PASS and executes hlt (-> KVM_EXIT_HLT through the #GP
# stub).  When the host re-enters, it starts over with the current list.
# This is the real-KVM counterpart of the simulated KVM's
# ``vcpu_write(gfns)``: a guest write through the MMU, with write faults
# and dirty logging, to pages of the host's choosing.
    .intel_syntax noprefix
    .code64
    .include "layout.inc"
    .text
entry:
    mov rcx, [CTRL_LIST_COUNT]
    mov rsi, LIST_GPA
    test rcx, rcx
    jz 2f
1:  mov rax, [rsi]
    inc byte ptr [rax]
    add rsi, 8
    dec rcx
    jnz 1b
2:  lock inc qword ptr [CTRL_PASS]
    hlt
    jmp entry

    .include "common.inc"
