/* daxio for aarch64 Linux: file I/O through a shared mmap, no libc (see testbed/images/daxio.py).
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
 * Messages come first, the entry point after them (aligned to 4 bytes).
 *
 * aarch64-linux-gnu-as -o daxio.o daxio-aarch64.S && \
 *   aarch64-linux-gnu-objcopy -O binary -j .text daxio.o daxio.bin
 */
        .text
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
        .balign 4
        .globl _start
_start:
        mov     x19, sp                 // x19 -> argc, argv[0], argv[1], ...
        ldr     x0, [x19]
        cmp     x0, #3
        b.lo    usage
        ldr     x1, [x19, #16]          // argv[1]: the mode, one letter
        ldrb    w20, [x1]
        ldrb    w2, [x1, #1]
        cbnz    w2, usage
        cmp     w20, #'d'
        b.eq    dax
        cmp     x0, #5
        b.ne    usage
        ldr     x0, [x19, #32]
        bl      number
        mov     x21, x0                 // OFFSET
        ldr     x0, [x19, #40]
        bl      number
        mov     x22, x0                 // LENGTH
        mov     x2, #2                  // O_RDWR
        mov     x23, #3                 // PROT_READ | PROT_WRITE
        cmp     w20, #'w'
        b.eq    1f
        mov     x2, #0                  // O_RDONLY
        mov     x23, #1                 // PROT_READ
        cmp     w20, #'r'
        b.ne    usage
1:      mov     x0, #-100               // openat(AT_FDCWD, FILE, flags, 0)
        ldr     x1, [x19, #24]
        mov     x3, #0
        mov     x8, #56
        svc     #0
        adr     x1, m_open
        mov     x2, #m_open_len
        tbnz    x0, #63, fail
        mov     x4, x0                  // mmap(0, OFFSET + LENGTH, prot, MAP_SHARED, fd, 0)
        mov     x0, #0
        add     x1, x21, x22
        mov     x2, x23
        mov     x3, #1
        mov     x5, #0
        mov     x8, #222
        svc     #0
        adr     x1, m_mmap
        mov     x2, #m_mmap_len
        cmn     x0, #4095               // -4095 <= x0 < 0: an error
        b.hs    fail
        mov     x24, x0                 // the mapping
        add     x25, x0, x21            // its byte at OFFSET
        mov     x26, #0                 // bytes done
        cmp     w20, #'w'
        b.ne    copyout
copyin: cmp     x26, x22
        b.hs    sync
        mov     x0, #0                  // read(0, at + done, LENGTH - done)
        add     x1, x25, x26
        sub     x2, x22, x26
        mov     x8, #63
        svc     #0
        adr     x1, m_read
        mov     x2, #m_read_len
        tbnz    x0, #63, fail
        cbz     x0, eof
        add     x26, x26, x0
        b       copyin
sync:   mov     x0, x24                 // msync(mapping, OFFSET + LENGTH, MS_SYNC)
        add     x1, x21, x22
        mov     x2, #4
        mov     x8, #227
        svc     #0
        adr     x1, m_msync
        mov     x2, #m_msync_len
        tbnz    x0, #63, fail
        b       ok
copyout:
        cmp     x26, x22
        b.hs    ok
        mov     x0, #1                  // write(1, at + done, LENGTH - done)
        add     x1, x25, x26
        sub     x2, x22, x26
        mov     x8, #64
        svc     #0
        adr     x1, m_write
        mov     x2, #m_write_len
        tbnz    x0, #63, fail
        add     x26, x26, x0
        b       copyout
ok:     mov     x0, #0
exit:   mov     x8, #94                 // exit_group(status)
        svc     #0
dax:    sub     sp, sp, #256            // statx(AT_FDCWD, FILE, 0, STATX_BASIC_STATS, buf)
        mov     x0, #-100
        ldr     x1, [x19, #24]
        mov     x2, #0
        mov     x3, #0x7ff
        mov     x4, sp
        mov     x8, #291
        svc     #0
        adr     x1, m_statx
        mov     x2, #m_statx_len
        tbnz    x0, #63, fail
        ldr     x0, [sp, #8]            // stx_attributes
        tbnz    x0, #21, ok             // STATX_ATTR_DAX
        mov     x0, #202
        adr     x1, m_notdax
        mov     x2, #m_notdax_len
        b       say
number: mov     x9, x0                  // x0 -> decimal digits; x0 = their value
        mov     x0, #0
        mov     x11, #10
        ldrb    w10, [x9]
        cbz     w10, usage
2:      ldrb    w10, [x9], #1
        cbz     w10, 3f
        sub     w10, w10, #'0'
        cmp     w10, #9
        b.hi    usage
        umulh   x12, x0, x11
        cbnz    x12, usage
        mul     x0, x0, x11
        adds    x0, x0, x10
        b.cs    usage
        b       2b
3:      ret
usage:  mov     x0, #200
        adr     x1, m_usage
        mov     x2, #m_usage_len
        b       say
eof:    mov     x0, #201
        adr     x1, m_short
        mov     x2, #m_short_len
        b       say
fail:   neg     x0, x0                  // x0 = -errno
say:    mov     x19, x0                 // write(2, message), then exit(status)
        mov     x0, #2
        mov     x8, #64
        svc     #0
        mov     x0, x19
        b       exit
