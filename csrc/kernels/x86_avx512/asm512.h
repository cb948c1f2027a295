// Register barriers of the AVX-512 folders' kernels. tools/x86_emu_check.sh compiles these
// folders on SIMDe (PQK_SIMDE_EMULATION, tests only), whose vectors are structs that no "v"
// operand can hold: there the barriers are memory ones, and the kernels' inline-asm
// instructions take their intrinsic branch.
#pragma once
#ifdef PQK_SIMDE_EMULATION
#define PQK_IN_ZMM(x) __asm__("" : "+m"(x))
#define PQK_KEEP_ZMM(x) __asm__ volatile("" : "+m"(x))
#define PQK_ZMM_ASM 0
#else
#define PQK_IN_ZMM(x) __asm__("" : "+v"(x))         // keep x in a register (one load, not two)
#define PQK_KEEP_ZMM(x) __asm__ volatile("" : "+v"(x))  // x live: chains the compiler cannot merge
#if defined(__GNUC__) && !defined(__clang__)
#define PQK_ZMM_ASM 1  // GCC: vpdpbusd / vdpbf16ps with {1to16} operands (see their uses)
#else
#define PQK_ZMM_ASM 0
#endif
#endif
