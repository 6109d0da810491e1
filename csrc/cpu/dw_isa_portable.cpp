// The portable variant of the CPU depthwise kernels (see dw_isa.h): 16-byte vectors and no
// target pragma, i.e. the compiler's baseline for the machine (SSE2 on x86-64, NEON on aarch64,
// scalar code elsewhere).  Runs on any CPU the library runs on.
#define HDNAS_VBYTES 16
#define HDNAS_TILE_R 3   // 3 x 4 accumulators + broadcast + product: 14 of 16 xmm (32 on NEON)
#define HDNAS_TILE_NV 4
#define HDNAS_GW_M 8
#define HDNAS_GW_U 1
#define HDNAS_PW_R 4    // pointwise: 4 x 2 accumulators + 2 inputs + broadcast; 3 x 3 + 3 + 1: of 16 xmm
#define HDNAS_PW_NV 2
#define HDNAS_PWW_M 3
#define HDNAS_PWW_U 3
#define HDNAS_ISA_NAME "portable"
#include "dw_simd_impl.h"

namespace hdnas {
namespace cpu {
const IsaKernels* kernels_portable() { return &kTable; }
}  // namespace cpu
}  // namespace hdnas
