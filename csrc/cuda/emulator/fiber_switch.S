// fastbon_emulator_switch(void** save_sp, void* load_sp): the emulator's fiber switch (see cuda_runtime.h). Saves
// the callee-saved registers on the current stack, stores the stack pointer in *save_sp, and resumes the fiber
// whose stack pointer is load_sp. Unlike swapcontext it makes no system call (no signal mask), which is what makes
// thousands of emulated threads per launch cheap. x86-64 System V only.
    .text
    .globl fastbon_emulator_switch
    .type fastbon_emulator_switch, @function
fastbon_emulator_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size fastbon_emulator_switch, .-fastbon_emulator_switch
    .section .note.GNU-stack,"",@progbits
