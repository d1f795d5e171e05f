// embed.cu: patch embedding around the patch GEMM, for a packed batch of images of mixed sizes.
//
//   forward:  images --patchify--> patches [ΣN_i, 3·p·p] --GEMM (Wᵀ)--> patch tokens [ΣN_i, D]
//             --assemble_tokens--> tokens [ΣT_i, D] = [CLS; patch tokens] + pos,   T_i = N_i + 1
//             (a tower without a class token, SigLIP: tokens = patch tokens + pos, T_i = N_i)
//   backward: d_tokens --tokens_to_patch_grads--> d_patches-tokens [ΣN_i, D] --GEMM (·W)-->
//             d_patches [ΣN_i, 3·p·p] --col2im--> d_images (÷ std, zero in dropped pixels)
//
// Precision: `_f32` kernels are fp32 throughout. `_bf16` kernels store the patch rows, patch
// tokens, tokens and their gradients in bf16; images, pixel gradients, cls and pos stay fp32;
// arithmetic is fp32 (rounded once on store).
//
// Layouts (row-major):
//   images     planar [3, H_i, W_i] per image, packed back to back (image i at pixel_offset_i)
//   patches    [ΣN_i, 3·p·p], N_i = gh_i·gw_i, gh_i = H_i / p, gw_i = W_i / p; image i's patch
//              n = (a, b) (grid row a, column b, n = a·gw_i + b) is row patch_offset_i + n; its
//              columns are ordered (channel c, row r, column s): col = c·p·p + r·p + s, holding the
//              normalised pixel (x[c, a·p + r, b·p + s] − mean_c) · (1/std_c). Pixels beyond the
//              last whole patch (rows ≥ gh·p, columns ≥ gw·p) are dropped, like a stride-p conv.
//   tokens     [ΣT_i, D]; image i's token t is row token_offset_i + t; token 0 is CLS when
//              class_tokens_i = 1 (cls is then [D]; with 0, cls is not read and may be null).
//   pos        [ΣT_i, D], each image's position embedding already interpolated to its grid by the
//              engine and packed like the tokens.
//   table      int[8 · images], per image: { pixel_offset, H, W, gh, gw, patch_offset,
//              token_offset, class_tokens (1 or 0) } (PRM_EMBED_* below; built by `PackedImages` in
//              src/gpu/kernels/embed.rs).
//
// Grids: blockIdx.y is the image; blockIdx.x / threadIdx.x stride over that image's elements
// (grid-stride), so no kernel searches the table. Index arithmetic within an image is 32-bit
// (the launchers assert every per-image element count fits in an int); offsets are size_t.
// Every output element is written exactly once (col2im writes zeros into dropped pixels).
// Pure gathers: deterministic.
//
// Launchers: src/gpu/kernels/embed.rs (patchify_f32, assemble_tokens_f32,
// tokens_to_patch_grads_f32, col2im_f32, their bf16 variants, and
// tokens_to_patch_grads_f32_bf16out: fp32 gradient in, the patch GEMM's bf16 operand out).
#include "common.cuh"

#define PRM_EMBED_TABLE_STRIDE 8
#define PRM_EMBED_PIXEL_OFFSET 0
#define PRM_EMBED_HEIGHT 1
#define PRM_EMBED_WIDTH 2
#define PRM_EMBED_GRID_H 3
#define PRM_EMBED_GRID_W 4
#define PRM_EMBED_PATCH_OFFSET 5
#define PRM_EMBED_TOKEN_OFFSET 6
#define PRM_EMBED_CLASS_TOKENS 7

__device__ __forceinline__ float prm_pick3(int c, float a, float b, float d) { return c == 0 ? a : (c == 1 ? b : d); }

__device__ __forceinline__ float prm_embed_load(const float* p) { return *p; }
__device__ __forceinline__ float prm_embed_load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void prm_embed_store(float* p, float v) { *p = v; }
__device__ __forceinline__ void prm_embed_store(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }
__device__ __forceinline__ void prm_embed_copy(float* d, const float* s) { *d = *s; }
__device__ __forceinline__ void prm_embed_copy(__nv_bfloat16* d, const __nv_bfloat16* s) { *d = *s; }
__device__ __forceinline__ void prm_embed_copy(__nv_bfloat16* d, const float* s) { *d = __float2bfloat16(*s); }

// patches[patch_offset + n, col] = (image[c, a·p + r, b·p + s] − mean_c) · inv_std_c
template <typename T>
__device__ __forceinline__ void prm_embed_patchify(const float* __restrict__ images, const int* __restrict__ table,
                                                   T* __restrict__ patches, int patch, float mean0, float mean1,
                                                   float mean2, float inv_std0, float inv_std1, float inv_std2) {
    const int* e = table + blockIdx.y * PRM_EMBED_TABLE_STRIDE;
    const size_t pixel_offset = (size_t)e[PRM_EMBED_PIXEL_OFFSET];
    const int h = e[PRM_EMBED_HEIGHT], w = e[PRM_EMBED_WIDTH], gw = e[PRM_EMBED_GRID_W];
    const int pp = patch * patch, cols = 3 * pp;
    const unsigned n = (unsigned)(e[PRM_EMBED_GRID_H] * gw * cols);
    const float* img = images + pixel_offset;
    T* out = patches + (size_t)e[PRM_EMBED_PATCH_OFFSET] * cols;
    const unsigned stride = gridDim.x * blockDim.x;
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const unsigned p_idx = i / cols, col = i % cols;
        const unsigned a = p_idx / gw, b = p_idx % gw;
        const unsigned c = col / pp, rs = col % pp, r = rs / patch, s = rs % patch;
        const float v = img[(c * h + a * patch + r) * w + b * patch + s];
        prm_embed_store(out + i, (v - prm_pick3(c, mean0, mean1, mean2)) * prm_pick3(c, inv_std0, inv_std1, inv_std2));
    }
}

extern "C" __global__ void prm_embed_patchify_f32(const float* __restrict__ images, const int* __restrict__ table,
                                                   float* __restrict__ patches, int patch, float mean0,
                                                   float mean1, float mean2, float inv_std0, float inv_std1,
                                                   float inv_std2) {
    prm_embed_patchify(images, table, patches, patch, mean0, mean1, mean2, inv_std0, inv_std1, inv_std2);
}
PRM_REGISTER_KERNEL(prm_embed_patchify_f32);

extern "C" __global__ void prm_embed_patchify_bf16(const float* __restrict__ images, const int* __restrict__ table,
                                                    __nv_bfloat16* __restrict__ patches, int patch, float mean0,
                                                    float mean1, float mean2, float inv_std0, float inv_std1,
                                                    float inv_std2) {
    prm_embed_patchify(images, table, patches, patch, mean0, mean1, mean2, inv_std0, inv_std1, inv_std2);
}
PRM_REGISTER_KERNEL(prm_embed_patchify_bf16);

// tokens[token_offset + t] = (t == 0 ? cls : patch_tokens[patch_offset + t − 1]) + pos[token_offset + t],
// or patch_tokens[patch_offset + t] + pos[token_offset + t] without a class token
template <typename T>
__device__ __forceinline__ void prm_embed_assemble_tokens(const T* __restrict__ patch_tokens,
                                                          const float* __restrict__ cls,
                                                          const float* __restrict__ pos,
                                                          const int* __restrict__ table, T* __restrict__ tokens,
                                                          int dim) {
    const int* e = table + blockIdx.y * PRM_EMBED_TABLE_STRIDE;
    const unsigned lead = (unsigned)(e[PRM_EMBED_CLASS_TOKENS] * dim);  // dim or 0
    const unsigned n = (unsigned)(e[PRM_EMBED_GRID_H] * e[PRM_EMBED_GRID_W] * dim) + lead;
    const size_t tok0 = (size_t)e[PRM_EMBED_TOKEN_OFFSET] * dim;
    const T* src = patch_tokens + (size_t)e[PRM_EMBED_PATCH_OFFSET] * dim;
    const float* p = pos + tok0;
    T* out = tokens + tok0;
    const unsigned stride = gridDim.x * blockDim.x;
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float v = i < lead ? cls[i] : prm_embed_load(src + (i - lead));  // token t ≥ c: patch t − c
        prm_embed_store(out + i, v + p[i]);
    }
}

extern "C" __global__ void prm_embed_assemble_tokens_f32(const float* __restrict__ patch_tokens,
                                                          const float* __restrict__ cls,
                                                          const float* __restrict__ pos,
                                                          const int* __restrict__ table,
                                                          float* __restrict__ tokens, int dim) {
    prm_embed_assemble_tokens(patch_tokens, cls, pos, table, tokens, dim);
}
PRM_REGISTER_KERNEL(prm_embed_assemble_tokens_f32);

extern "C" __global__ void prm_embed_assemble_tokens_bf16(const __nv_bfloat16* __restrict__ patch_tokens,
                                                           const float* __restrict__ cls,
                                                           const float* __restrict__ pos,
                                                           const int* __restrict__ table,
                                                           __nv_bfloat16* __restrict__ tokens, int dim) {
    prm_embed_assemble_tokens(patch_tokens, cls, pos, table, tokens, dim);
}
PRM_REGISTER_KERNEL(prm_embed_assemble_tokens_bf16);

// d_patch_tokens[patch_offset + n] = d_tokens[token_offset + c + n]: drops each image's CLS row
// (c = class_tokens).
// (f32 → bf16: rounded to nearest even, as the patch GEMM's bf16 operand.)
template <typename T, typename TOut>
__device__ __forceinline__ void prm_embed_tokens_to_patch_grads(const T* __restrict__ d_tokens,
                                                                const int* __restrict__ table,
                                                                TOut* __restrict__ d_patch_tokens, int dim) {
    const int* e = table + blockIdx.y * PRM_EMBED_TABLE_STRIDE;
    const unsigned n = (unsigned)(e[PRM_EMBED_GRID_H] * e[PRM_EMBED_GRID_W] * dim);
    const T* src = d_tokens + ((size_t)e[PRM_EMBED_TOKEN_OFFSET] + e[PRM_EMBED_CLASS_TOKENS]) * dim;
    TOut* dst = d_patch_tokens + (size_t)e[PRM_EMBED_PATCH_OFFSET] * dim;
    const unsigned stride = gridDim.x * blockDim.x;
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) prm_embed_copy(dst + i, src + i);
}

extern "C" __global__ void prm_embed_tokens_to_patch_grads_f32(const float* __restrict__ d_tokens,
                                                                const int* __restrict__ table,
                                                                float* __restrict__ d_patch_tokens, int dim) {
    prm_embed_tokens_to_patch_grads(d_tokens, table, d_patch_tokens, dim);
}
PRM_REGISTER_KERNEL(prm_embed_tokens_to_patch_grads_f32);

extern "C" __global__ void prm_embed_tokens_to_patch_grads_bf16(const __nv_bfloat16* __restrict__ d_tokens,
                                                                 const int* __restrict__ table,
                                                                 __nv_bfloat16* __restrict__ d_patch_tokens,
                                                                 int dim) {
    prm_embed_tokens_to_patch_grads(d_tokens, table, d_patch_tokens, dim);
}
PRM_REGISTER_KERNEL(prm_embed_tokens_to_patch_grads_bf16);

extern "C" __global__ void prm_embed_tokens_to_patch_grads_f32_bf16out(const float* __restrict__ d_tokens,
                                                                        const int* __restrict__ table,
                                                                        __nv_bfloat16* __restrict__ d_patch_tokens,
                                                                        int dim) {
    prm_embed_tokens_to_patch_grads(d_tokens, table, d_patch_tokens, dim);
}
PRM_REGISTER_KERNEL(prm_embed_tokens_to_patch_grads_f32_bf16out);

// d_images[c, y, x] = d_patches[patch_offset + (y/p)·gw + x/p, c·p·p + (y%p)·p + x%p] · inv_std_c
// inside the whole patches, 0 in the dropped border (gather over every pixel of the image).
template <typename T>
__device__ __forceinline__ void prm_embed_col2im(const T* __restrict__ d_patches, const int* __restrict__ table,
                                                 float* __restrict__ d_images, int patch, float inv_std0,
                                                 float inv_std1, float inv_std2) {
    const int* e = table + blockIdx.y * PRM_EMBED_TABLE_STRIDE;
    const unsigned w = e[PRM_EMBED_WIDTH], gw = e[PRM_EMBED_GRID_W], p = patch;
    const unsigned hc = e[PRM_EMBED_GRID_H] * p, wc = gw * p;  // covered rows / columns
    const unsigned pp = p * p, cols = 3 * pp;
    const unsigned hw = (unsigned)e[PRM_EMBED_HEIGHT] * w, n = 3 * hw;
    const T* src = d_patches + (size_t)e[PRM_EMBED_PATCH_OFFSET] * cols;
    float* dst = d_images + (size_t)e[PRM_EMBED_PIXEL_OFFSET];
    const unsigned stride = gridDim.x * blockDim.x;
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const unsigned c = i / hw, yx = i % hw, y = yx / w, x = yx % w;
        float v = 0.0f;
        if (y < hc && x < wc) {
            const unsigned pidx = (y / p) * gw + x / p;
            const unsigned col = c * pp + (y % p) * p + x % p;
            v = prm_embed_load(src + ((size_t)pidx * cols + col)) * prm_pick3((int)c, inv_std0, inv_std1, inv_std2);
        }
        dst[i] = v;
    }
}

extern "C" __global__ void prm_embed_col2im_f32(const float* __restrict__ d_patches, const int* __restrict__ table,
                                                 float* __restrict__ d_images, int patch, float inv_std0,
                                                 float inv_std1, float inv_std2) {
    prm_embed_col2im(d_patches, table, d_images, patch, inv_std0, inv_std1, inv_std2);
}
PRM_REGISTER_KERNEL(prm_embed_col2im_f32);

extern "C" __global__ void prm_embed_col2im_bf16(const __nv_bfloat16* __restrict__ d_patches,
                                                  const int* __restrict__ table, float* __restrict__ d_images,
                                                  int patch, float inv_std0, float inv_std1, float inv_std2) {
    prm_embed_col2im(d_patches, table, d_images, patch, inv_std0, inv_std1, inv_std2);
}
PRM_REGISTER_KERNEL(prm_embed_col2im_bf16);
