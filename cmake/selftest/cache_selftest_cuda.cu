// vllm-forge: a small CUDA target compiled by nvcc through the same compiler-launcher path
// (and the same TORCH_CUDA_ARCH_LIST -> CUDA architectures mapping) as the flash-attention
// extensions. Compile-only on machines without a GPU.
#include <cuda_runtime.h>

__global__ void vllm_forge_axpy(int n, float a, const float* x, float* y) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = a * x[i] + y[i];
}

extern "C" cudaError_t vllm_forge_axpy_launch(int n, float a, const float* x, float* y, cudaStream_t s) {
  vllm_forge_axpy<<<(n + 255) / 256, 256, 0, s>>>(n, a, x, y);
  return cudaGetLastError();
}
