# "selftest": guest_code() of the kernel's KVM dirty_log_test
# (tools/testing/selftests/kvm/dirty_log_test.c), as a 64-bit CPL3 loop.
#
#   1. write the current iteration (u64 at CTRL_ITERATION, set by the host
#      at any time) into the first 8 bytes of every page of the data range;
#   2. forever: write the current iteration into CTRL_PER_LOOP pseudo-random
#      pages of the data range (xorshift64 seeded by the host in CTRL_RNG;
#      the iteration is re-read for every write, like READ_ONCE), then
#      GUEST_SYNC: out to PORT_SYNC (-> KVM_EXIT_IO), the host may change
#      the iteration or stop the vCPU there.
#
# If CTRL_HALT_REQ is nonzero at a loop boundary the guest executes hlt.
    .intel_syntax noprefix
    .code64
    .include "layout.inc"
    .text
entry:
    mov rdi, [CTRL_START]
    mov rsi, [CTRL_STRIDE]
    mov r8, [CTRL_END]
    mov r9, r8
    sub r9, rdi
    shr r9, 12                   # r9 = number of pages
first:
    mov rax, [CTRL_ITERATION]
    mov [rdi], rax
    add rdi, rsi
    cmp rdi, r8
    jb first
    mov r10, [CTRL_RNG]
loop:
    mov rcx, [CTRL_PER_LOOP]
one:
    mov rax, r10                 # xorshift64: x ^= x<<13; x ^= x>>7; x ^= x<<17
    shl rax, 13
    xor r10, rax
    mov rax, r10
    shr rax, 7
    xor r10, rax
    mov rax, r10
    shl rax, 17
    xor r10, rax
    mov rax, r10
    xor edx, edx
    div r9                       # rdx = x % pages
    shl rdx, 12
    add rdx, [CTRL_START]
    mov rax, [CTRL_ITERATION]
    mov [rdx], rax               # the tracked store
    dec rcx
    jnz one
    mov [CTRL_RNG], r10
    lock inc qword ptr [CTRL_SYNCS]
    mov dx, PORT_SYNC
    mov eax, 1
    out dx, eax                  # GUEST_SYNC(1)
    cmp qword ptr [CTRL_HALT_REQ], 0
    je loop
    hlt
    jmp loop

    .include "common.inc"
