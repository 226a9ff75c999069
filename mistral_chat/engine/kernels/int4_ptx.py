"""The int4 kernel's inline PTX (kernels/int4_gemv.py), kept as strings so that tests can run each piece through a
model of its instructions (tests/test_int4_gemv.py): codes become fp16 pairs with `lop3`, and packed fp16
arithmetic multiplies and adds them two at a time, as FasterTransformer's and Marlin's int4 kernels do."""

# The end of both activation pieces below: the four fp16 pairs p0..p3 out as $0..$3, and their sum / 32 as $4.
_PAIRS_AND_SUM = """\
    add.rn.f16x2 s0, p0, p1;
    add.rn.f16x2 s1, p2, p3;
    add.rn.f16x2 s0, s0, s1;
    mul.rn.f16x2 $4, s0, k;
    mov.b32 $0, p0;
    mov.b32 $1, p1;
    mov.b32 $2, p2;
    mov.b32 $3, p3;
}"""
# Eight activations x0..x7 ($5..$12, float32) as four fp16 pairs (x_j in the low half, x_j+4 in the high half: cvt
# puts its first operand in the high half), and the pairs' sum / 32 (0x2800: 1/32 in fp16).
X_PAIRS_ASM = """{
    .reg .b32 p0, p1, p2, p3, s0, s1, k;
    mov.b32 k, 0x28002800;
    cvt.rn.f16x2.f32 p0, $9, $5;
    cvt.rn.f16x2.f32 p1, $10, $6;
    cvt.rn.f16x2.f32 p2, $11, $7;
    cvt.rn.f16x2.f32 p3, $12, $8;
""" + _PAIRS_AND_SUM
# The same from eight bf16 activations as read, two a 32-bit word ($5..$8: x0 x1, x2 x3, x4 x5, x6 x7, the even
# one in the low half): a bf16 is the high half of its float32.
X_PAIRS_BF16_ASM = """{
    .reg .b32 f0, f1, f2, f3, f4, f5, f6, f7, p0, p1, p2, p3, s0, s1, k;
    mov.b32 k, 0x28002800;
    shl.b32 f0, $5, 16;
    and.b32 f1, $5, 0xFFFF0000;
    shl.b32 f2, $6, 16;
    and.b32 f3, $6, 0xFFFF0000;
    shl.b32 f4, $7, 16;
    and.b32 f5, $7, 0xFFFF0000;
    shl.b32 f6, $8, 16;
    and.b32 f7, $8, 0xFFFF0000;
    cvt.rn.f16x2.f32 p0, f4, f0;
    cvt.rn.f16x2.f32 p1, f5, f1;
    cvt.rn.f16x2.f32 p2, f6, f2;
    cvt.rn.f16x2.f32 p3, f7, f3;
""" + _PAIRS_AND_SUM
# Codes j and j + 4 of word $1 as (q - 8) / 32 in one fp16 pair (low half: code j), times the pair $2..$5 of
# activations (x_j, x_j+4), j = 0..3, added to the fp16 pair of sums $6. Codes at bits 0-3 (and 16-19) give
# 1024 + q: (q - 8) / 32 = fma(1024 + q, 1/32, -32.25); codes at bits 4-7 give 1024 + 16 q: (q - 8) / 32 =
# fma(1024 + 16 q, 1/512, -2.25); codes 2, 3, 6, 7 the same after a shift by 8. Each fma is exact. Constants as
# fp16 bits: 1/32 = 0x2800, -32.25 = 0xD008, 1/512 = 0x1800, -2.25 = 0xC080; 0xEA: lop3's table for (a & b) | c.
WORD_DOT_ASM = """{
    .reg .b32 t, h0, h1, h2, h3, m0, a0, m1, a1, s;
    mov.b32 m0, 0x28002800;
    mov.b32 a0, 0xD008D008;
    mov.b32 m1, 0x18001800;
    mov.b32 a1, 0xC080C080;
    shr.u32 t, $1, 8;
    lop3.b32 h0, $1, 0x000F000F, 0x64006400, 0xEA;
    lop3.b32 h1, $1, 0x00F000F0, 0x64006400, 0xEA;
    lop3.b32 h2, t, 0x000F000F, 0x64006400, 0xEA;
    lop3.b32 h3, t, 0x00F000F0, 0x64006400, 0xEA;
    fma.rn.f16x2 h0, h0, m0, a0;
    fma.rn.f16x2 h1, h1, m1, a1;
    fma.rn.f16x2 h2, h2, m0, a0;
    fma.rn.f16x2 h3, h3, m1, a1;
    fma.rn.f16x2 s, h0, $2, $6;
    fma.rn.f16x2 s, h1, $3, s;
    fma.rn.f16x2 s, h2, $4, s;
    fma.rn.f16x2 $0, h3, $5, s;
}"""
# The two halves of an fp16 pair of sums, widened to float32 (low half $0, high half $1).
WIDEN_ASM = """{
    .reg .f16 lo, hi;
    mov.b32 {lo, hi}, $2;
    cvt.f32.f16 $0, lo;
    cvt.f32.f16 $1, hi;
}"""
HADD2_ASM = "add.rn.f16x2 $0, $1, $2;"
# Ask L2 for the line at address $1 (the output $0: 0, as inline asm must have one).
PREFETCH_ASM = "prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;"
