/* daxio for x86_64 Linux: file I/O through a shared mmap, no libc (see testbed/images/daxio.py).
 *
 *   daxio w FILE OFFSET LENGTH   read LENGTH bytes from stdin into FILE's MAP_SHARED mapping
 *                                at OFFSET (opened O_RDWR), then msync(MS_SYNC)
 *   daxio r FILE OFFSET LENGTH   write LENGTH bytes of FILE's mapping at OFFSET to stdout
 *   daxio d FILE                 exit 0 if statx() says STATX_ATTR_DAX
 *
 * Exit status: 0; the errno of the call that failed, named on stderr ("daxio: mmap");
 * 200 usage; 201 stdin ended before LENGTH bytes; 202 not DAX. OFFSET and LENGTH are
 * decimal; the mapping covers [0, OFFSET + LENGTH) of the file.
 *
 * Messages come first, the entry point after them.
 *
 * as --64 -o daxio.o daxio-x86_64.S && objcopy -O binary -j .text daxio.o daxio.bin
 */
        .intel_syntax noprefix
        .text
/* The messages first: their lengths are then known where the code uses them. */
m_open:   .ascii "daxio: open\n"
        .equ    m_open_len, . - m_open
m_mmap:   .ascii "daxio: mmap\n"
        .equ    m_mmap_len, . - m_mmap
m_read:   .ascii "daxio: read\n"
        .equ    m_read_len, . - m_read
m_msync:  .ascii "daxio: msync\n"
        .equ    m_msync_len, . - m_msync
m_write:  .ascii "daxio: write\n"
        .equ    m_write_len, . - m_write
m_statx:  .ascii "daxio: statx\n"
        .equ    m_statx_len, . - m_statx
m_notdax: .ascii "daxio: not DAX\n"
        .equ    m_notdax_len, . - m_notdax
m_short:  .ascii "daxio: short input\n"
        .equ    m_short_len, . - m_short
m_usage:  .ascii "usage: daxio w|r FILE OFFSET LENGTH, or daxio d FILE\n"
        .equ    m_usage_len, . - m_usage
        .globl _start
_start:
        mov     r12, rsp                /* r12 -> argc, argv[0], argv[1], ... */
        mov     rax, [r12]
        cmp     rax, 3
        jb      usage
        mov     rsi, [r12 + 16]         /* argv[1]: the mode, one letter */
        movzx   r15d, byte ptr [rsi]
        cmp     byte ptr [rsi + 1], 0
        jne     usage
        cmp     r15d, 'd'
        je      dax
        cmp     rax, 5
        jne     usage
        mov     rdi, [r12 + 32]
        call    number
        mov     r13, rax                /* OFFSET */
        mov     rdi, [r12 + 40]
        call    number
        mov     r14, rax                /* LENGTH */
        mov     edx, 2                  /* O_RDWR */
        mov     ebp, 3                  /* PROT_READ | PROT_WRITE */
        cmp     r15d, 'w'
        je      1f
        xor     edx, edx                /* O_RDONLY */
        mov     ebp, 1                  /* PROT_READ */
        cmp     r15d, 'r'
        jne     usage
1:      mov     edi, -100               /* openat(AT_FDCWD, FILE, flags, 0) */
        mov     rsi, [r12 + 24]
        xor     r10d, r10d
        mov     eax, 257
        syscall
        lea     rsi, [rip + m_open]
        mov     edx, m_open_len
        test    rax, rax
        js      fail
        mov     r8, rax                 /* mmap(0, OFFSET + LENGTH, prot, MAP_SHARED, fd, 0) */
        xor     edi, edi
        lea     rsi, [r13 + r14]
        mov     edx, ebp
        mov     r10d, 1
        xor     r9d, r9d
        mov     eax, 9
        syscall
        lea     rsi, [rip + m_mmap]
        mov     edx, m_mmap_len
        cmp     rax, -4095
        jae     fail
        mov     r12, rax                /* the mapping */
        lea     rbp, [rax + r13]        /* its byte at OFFSET */
        xor     ebx, ebx                /* bytes done */
        cmp     r15d, 'w'
        jne     copyout
copyin: cmp     rbx, r14
        jae     sync
        xor     edi, edi                /* read(0, at + done, LENGTH - done) */
        lea     rsi, [rbp + rbx]
        mov     rdx, r14
        sub     rdx, rbx
        xor     eax, eax
        syscall
        lea     rsi, [rip + m_read]
        mov     edx, m_read_len
        test    rax, rax
        js      fail
        jz      eof
        add     rbx, rax
        jmp     copyin
sync:   mov     rdi, r12                /* msync(mapping, OFFSET + LENGTH, MS_SYNC) */
        lea     rsi, [r13 + r14]
        mov     edx, 4
        mov     eax, 26
        syscall
        lea     rsi, [rip + m_msync]
        mov     edx, m_msync_len
        test    rax, rax
        js      fail
        jmp     ok
copyout:cmp     rbx, r14
        jae     ok
        mov     edi, 1                  /* write(1, at + done, LENGTH - done) */
        lea     rsi, [rbp + rbx]
        mov     rdx, r14
        sub     rdx, rbx
        mov     eax, 1
        syscall
        lea     rsi, [rip + m_write]
        mov     edx, m_write_len
        test    rax, rax
        js      fail
        add     rbx, rax
        jmp     copyout
ok:     xor     edi, edi
exit:   mov     eax, 231                /* exit_group(status) */
        syscall
dax:    sub     rsp, 256                /* statx(AT_FDCWD, FILE, 0, STATX_BASIC_STATS, buf) */
        mov     edi, -100
        mov     rsi, [r12 + 24]
        xor     edx, edx
        mov     r10d, 0x7ff
        mov     r8, rsp
        mov     eax, 332
        syscall
        lea     rsi, [rip + m_statx]
        mov     edx, m_statx_len
        test    rax, rax
        js      fail
        test    dword ptr [rsp + 8], 0x200000   /* stx_attributes & STATX_ATTR_DAX */
        jnz     ok
        mov     edi, 202
        lea     rsi, [rip + m_notdax]
        mov     edx, m_notdax_len
        jmp     say
number: xor     eax, eax                /* rdi -> decimal digits; rax = their value */
        cmp     byte ptr [rdi], 0
        je      usage
2:      movzx   ecx, byte ptr [rdi]
        test    ecx, ecx
        jz      3f
        sub     ecx, '0'
        cmp     ecx, 9
        ja      usage
        imul    rax, rax, 10
        jo      usage
        add     rax, rcx
        jo      usage
        inc     rdi
        jmp     2b
3:      ret
usage:  mov     edi, 200
        lea     rsi, [rip + m_usage]
        mov     edx, m_usage_len
        jmp     say
eof:    mov     edi, 201
        lea     rsi, [rip + m_short]
        mov     edx, m_short_len
        jmp     say
fail:   neg     rax                     /* rax = -errno */
        mov     rdi, rax
say:    mov     rbx, rdi                /* write(2, message), then exit(status) */
        mov     edi, 2
        mov     eax, 1
        syscall
        mov     rdi, rbx
        jmp     exit
