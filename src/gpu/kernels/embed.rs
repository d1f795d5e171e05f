//! Launchers for `kernels/embed.cu`: the patch embedding around the patch GEMM, for a packed
//! batch of images of mixed sizes, and its input-pixel gradient.
//!
//! Forward (with `W` the patch weight `[D, 3·p·p]`):
//! 1. [`patchify_f32`]: planar images → normalised patch rows `[ΣN_i, 3·p·p]` (im2col);
//! 2. GEMM `patches · Wᵀ` → patch tokens `[ΣN_i, D]` ([`crate::gpu::gemm::matmul_f32`]);
//! 3. [`assemble_tokens_f32`]: `[CLS; patch tokens] + pos` → tokens `[ΣT_i, D]`, `T_i = N_i + 1`.
//!
//! Backward:
//! 1. [`tokens_to_patch_grads_f32`]: `d_tokens [ΣT_i, D]` → `[ΣN_i, D]` (CLS rows dropped);
//! 2. GEMM `· W` → `d_patches [ΣN_i, 3·p·p]`;
//! 3. [`col2im_f32`]: → `d_images`, planar and packed like the input, divided by std, zero in
//!    the pixels beyond the last whole patch.
//!
//! Each launcher also comes in bf16 storage (`_bf16`): patch rows, patch tokens, tokens and
//! their gradients in bf16; images, pixel gradients, `cls` and `pos` in fp32; fp32 arithmetic.
//!
//! Every launcher takes the batch's [`PackedImages`] (sizes, grids, offsets) and the same
//! table uploaded once with [`PackedImages::upload_table`].
//!
//! ```no_run
//! use prm::gpu::{Device, kernels::embed::{self, PackedImages}};
//! # fn main() -> Result<(), prm::gpu::GpuError> {
//! let dev = Device::sim();
//! let packing = PackedImages::new(&[(224, 224), (37, 53)], 16);
//! let table = packing.upload_table(&dev)?;
//! let images = dev.upload(&vec![0.5f32; packing.total_pixels])?;
//! let mut patches = dev.alloc::<f32>(packing.total_patches * packing.patch_cols())?;
//! embed::patchify_f32(&dev, &packing, &table, &images, &mut patches,
//!                     [0.481, 0.458, 0.408], [0.269, 0.261, 0.276])?;
//! # Ok(()) }
//! ```

use half::bf16;

use crate::gpu::{Buffer, Device, Element, GpuError, KernelArgs, LaunchConfig};

/// Storage types of the patch rows and tokens, with their kernel name suffix.
trait Storage: Element {
    const SUFFIX: &'static str;
}
impl Storage for f32 {
    const SUFFIX: &'static str = "f32";
}
impl Storage for bf16 {
    const SUFFIX: &'static str = "bf16";
}

/// Ints per image in the kernel table (`PRM_EMBED_TABLE_STRIDE` in `kernels/embed.cu`).
pub const TABLE_STRIDE: usize = 8;

const THREADS: u32 = 256;
/// Blocks per image at most (grid-stride beyond).
const MAX_BLOCKS_X: usize = 1024;

/// One image of a packed batch. All offsets count elements (pixels) or rows from the start of
/// the packed buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackedImage {
    /// First element of the image's planar `[3, H, W]` block in the packed image buffer.
    pub pixel_offset: usize,
    pub height: usize,
    pub width: usize,
    /// Patch grid `(H / p, W / p)`: pixels beyond the last whole patch are dropped.
    pub grid_h: usize,
    pub grid_w: usize,
    /// First row of the image's patches in `[ΣN_i, ·]` (patch rows, patch tokens).
    pub patch_offset: usize,
    /// First row of the image's tokens (its CLS token, when the tower has one) in `[ΣT_i, ·]`.
    pub token_offset: usize,
    /// Tokens before the patches: 1 (the CLS token) or 0 (a tower without a class token).
    pub class_tokens: usize,
}

impl PackedImage {
    /// `N = gh · gw`.
    pub fn patches(&self) -> usize {
        self.grid_h * self.grid_w
    }
    /// `T = N + 1` (the CLS token first), or `T = N` without a class token.
    pub fn tokens(&self) -> usize {
        self.patches() + self.class_tokens
    }
    pub fn pixels(&self) -> usize {
        3 * self.height * self.width
    }
}

/// The layout of a packed batch of images of mixed sizes: planar `[3, H_i, W_i]` images back to
/// back, their patch rows `[ΣN_i, 3·p·p]` and tokens `[ΣT_i, D]` (image by image, CLS first
/// when the tower has a class token).
///
/// The kernel table ([`PackedImages::table`]) holds, per image, the 8 ints
/// `{ pixel_offset, H, W, gh, gw, patch_offset, token_offset, class_tokens }`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedImages {
    /// Patch side p.
    pub patch: usize,
    pub images: Vec<PackedImage>,
    /// `Σ 3·H_i·W_i`.
    pub total_pixels: usize,
    /// `Σ N_i`.
    pub total_patches: usize,
    /// `Σ T_i = Σ N_i + images · class_tokens`.
    pub total_tokens: usize,
    /// Tokens before each image's patches: 1 (CLS) or 0.
    pub class_tokens: usize,
}

impl PackedImages {
    /// The packing of images of sizes `(height, width)`, in order, cut into `patch`×`patch`
    /// patches, each image's tokens led by a CLS token. Panics when an image is smaller than
    /// one patch or the batch does not fit the kernels' 32-bit offsets.
    pub fn new(sizes: &[(usize, usize)], patch: usize) -> Self {
        Self::with_class_tokens(sizes, patch, 1)
    }

    /// [`PackedImages::new`] for a tower with `class_tokens` (1 or 0) tokens before the
    /// patches ([`crate::model::VisionConfig::class_tokens`]).
    pub fn with_class_tokens(sizes: &[(usize, usize)], patch: usize, class_tokens: usize) -> Self {
        assert!(patch > 0, "patch size 0");
        assert!(class_tokens <= 1, "{class_tokens} class tokens (0 or 1)");
        let mut images = Vec::with_capacity(sizes.len());
        let (mut pixels, mut patches, mut tokens) = (0usize, 0usize, 0usize);
        for &(height, width) in sizes {
            assert!(
                height >= patch && width >= patch,
                "image of {height}x{width} is smaller than one {patch}x{patch} patch"
            );
            let img = PackedImage {
                pixel_offset: pixels,
                height,
                width,
                grid_h: height / patch,
                grid_w: width / patch,
                patch_offset: patches,
                token_offset: tokens,
                class_tokens,
            };
            pixels += img.pixels();
            patches += img.patches();
            tokens += img.tokens();
            images.push(img);
        }
        assert!(
            pixels <= i32::MAX as usize && tokens <= i32::MAX as usize,
            "batch of {} pixels is too large for one packed launch; split it",
            pixels
        );
        PackedImages {
            patch,
            images,
            total_pixels: pixels,
            total_patches: patches,
            total_tokens: tokens,
            class_tokens,
        }
    }

    pub fn len(&self) -> usize {
        self.images.len()
    }
    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }
    /// Columns of a patch row, `3·p·p`.
    pub fn patch_cols(&self) -> usize {
        3 * self.patch * self.patch
    }

    /// The kernel table, `TABLE_STRIDE` ints per image.
    pub fn table(&self) -> Vec<i32> {
        self.images
            .iter()
            .flat_map(|m| {
                [
                    m.pixel_offset as i32,
                    m.height as i32,
                    m.width as i32,
                    m.grid_h as i32,
                    m.grid_w as i32,
                    m.patch_offset as i32,
                    m.token_offset as i32,
                    m.class_tokens as i32,
                ]
            })
            .collect()
    }

    /// Uploads [`PackedImages::table`].
    pub fn upload_table(&self, dev: &Device) -> Result<Buffer<i32>, GpuError> {
        dev.upload(&self.table())
    }

    /// Token offsets (`cu_seqlens`, length images + 1) for attention over the packed tokens.
    pub fn cu_seqlens(&self) -> Vec<i32> {
        let mut v: Vec<i32> = self.images.iter().map(|m| m.token_offset as i32).collect();
        v.push(self.total_tokens as i32);
        v
    }

    /// Per-image index arithmetic in the kernels is 32-bit.
    fn check_tokens(&self, dim: usize) {
        let most = self.images.iter().map(|m| m.tokens()).max().unwrap_or(0);
        assert!(
            most * dim <= i32::MAX as usize,
            "an image of {most} tokens of width {dim} is too large for the embedding kernels"
        );
    }

    fn check_table(&self, table: &Buffer<i32>) {
        assert_eq!(
            table.len(),
            self.len() * TABLE_STRIDE,
            "embed table has {} ints, the batch of {} images needs {}",
            table.len(),
            self.len(),
            self.len() * TABLE_STRIDE
        );
        assert!(self.len() <= 65535, "more than 65535 images in one launch");
    }

    /// A grid with one row of blocks per image, sized for the image with the most elements
    /// (`per_image` gives an image's element count).
    fn config(&self, per_image: impl Fn(&PackedImage) -> usize) -> LaunchConfig {
        let most = self.images.iter().map(per_image).max().unwrap_or(0);
        let blocks = most.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS_X);
        LaunchConfig {
            grid: (blocks as u32, self.len() as u32, 1),
            block: (THREADS, 1, 1),
            shared_bytes: 0,
        }
    }
}

/// Shared body of `patchify_f32` / `patchify_bf16`.
fn patchify<T: Storage>(
    dev: &Device,
    packing: &PackedImages,
    table: &Buffer<i32>,
    images: &Buffer<f32>,
    patches: &mut Buffer<T>,
    mean: [f32; 3],
    std: [f32; 3],
) -> Result<(), GpuError> {
    packing.check_table(table);
    assert_eq!(
        images.len(),
        packing.total_pixels,
        "packed images buffer has the wrong length"
    );
    assert_eq!(
        patches.len(),
        packing.total_patches * packing.patch_cols(),
        "patches buffer is not [{}, {}]",
        packing.total_patches,
        packing.patch_cols()
    );
    if packing.is_empty() {
        return Ok(());
    }
    let cols = packing.patch_cols();
    let cfg = packing.config(|m| m.patches() * cols);
    let mut args = KernelArgs::new();
    args.input(images)
        .input(table)
        .output(patches)
        .i32(packing.patch as i32)
        .f32(mean[0])
        .f32(mean[1])
        .f32(mean[2])
        .f32(1.0 / std[0])
        .f32(1.0 / std[1])
        .f32(1.0 / std[2]);
    dev.launch(&format!("prm_embed_patchify_{}", T::SUFFIX), cfg, &mut args)
}

/// Shared body of `assemble_tokens_f32` / `assemble_tokens_bf16`.
#[allow(clippy::too_many_arguments)]
fn assemble_tokens<T: Storage>(
    dev: &Device,
    packing: &PackedImages,
    table: &Buffer<i32>,
    patch_tokens: &Buffer<T>,
    cls: Option<&Buffer<f32>>,
    pos: &Buffer<f32>,
    tokens: &mut Buffer<T>,
    dim: usize,
) -> Result<(), GpuError> {
    packing.check_table(table);
    assert_eq!(
        patch_tokens.len(),
        packing.total_patches * dim,
        "patch tokens are not [{}, {dim}]",
        packing.total_patches
    );
    match cls {
        Some(cls) => {
            assert_eq!(
                packing.class_tokens, 1,
                "a class embedding for a packing without CLS"
            );
            assert_eq!(cls.len(), dim, "class embedding is not [{dim}]");
        }
        None => assert_eq!(
            packing.class_tokens, 0,
            "a packing with CLS needs its embedding"
        ),
    }
    assert_eq!(
        pos.len(),
        packing.total_tokens * dim,
        "position embedding is not [{}, {dim}]",
        packing.total_tokens
    );
    assert_eq!(
        tokens.len(),
        packing.total_tokens * dim,
        "tokens are not [{}, {dim}]",
        packing.total_tokens
    );
    if packing.is_empty() {
        return Ok(());
    }
    packing.check_tokens(dim);
    let cfg = packing.config(|m| m.tokens() * dim);
    let mut args = KernelArgs::new();
    args.input(patch_tokens);
    // Without a class token the kernel never reads `cls`.
    match cls {
        Some(c) => args.input(c),
        None => args.u64(0),
    };
    args.input(pos).input(table).output(tokens).i32(dim as i32);
    dev.launch(
        &format!("prm_embed_assemble_tokens_{}", T::SUFFIX),
        cfg,
        &mut args,
    )
}

/// Shared body of `tokens_to_patch_grads_f32` / `tokens_to_patch_grads_bf16`.
fn tokens_to_patch_grads<T: Storage, U: Storage>(
    dev: &Device,
    packing: &PackedImages,
    table: &Buffer<i32>,
    d_tokens: &Buffer<T>,
    d_patch_tokens: &mut Buffer<U>,
    dim: usize,
) -> Result<(), GpuError> {
    packing.check_table(table);
    assert_eq!(
        d_tokens.len(),
        packing.total_tokens * dim,
        "d_tokens are not [{}, {dim}]",
        packing.total_tokens
    );
    assert_eq!(
        d_patch_tokens.len(),
        packing.total_patches * dim,
        "d_patch_tokens are not [{}, {dim}]",
        packing.total_patches
    );
    if packing.is_empty() {
        return Ok(());
    }
    packing.check_tokens(dim);
    let cfg = packing.config(|m| m.patches() * dim);
    let mut args = KernelArgs::new();
    args.input(d_tokens)
        .input(table)
        .output(d_patch_tokens)
        .i32(dim as i32);
    let name = if T::SUFFIX == U::SUFFIX {
        format!("prm_embed_tokens_to_patch_grads_{}", T::SUFFIX)
    } else {
        format!(
            "prm_embed_tokens_to_patch_grads_{}_{}out",
            T::SUFFIX,
            U::SUFFIX
        )
    };
    dev.launch(&name, cfg, &mut args)
}

/// Shared body of `col2im_f32` / `col2im_bf16`.
fn col2im<T: Storage>(
    dev: &Device,
    packing: &PackedImages,
    table: &Buffer<i32>,
    d_patches: &Buffer<T>,
    d_images: &mut Buffer<f32>,
    std: [f32; 3],
) -> Result<(), GpuError> {
    packing.check_table(table);
    assert_eq!(
        d_patches.len(),
        packing.total_patches * packing.patch_cols(),
        "d_patches are not [{}, {}]",
        packing.total_patches,
        packing.patch_cols()
    );
    assert_eq!(
        d_images.len(),
        packing.total_pixels,
        "packed image gradient has the wrong length"
    );
    if packing.is_empty() {
        return Ok(());
    }
    let cfg = packing.config(|m| m.pixels());
    let mut args = KernelArgs::new();
    args.input(d_patches)
        .input(table)
        .output(d_images)
        .i32(packing.patch as i32)
        .f32(1.0 / std[0])
        .f32(1.0 / std[1])
        .f32(1.0 / std[2]);
    dev.launch(&format!("prm_embed_col2im_{}", T::SUFFIX), cfg, &mut args)
}

/// Normalise and cut into patches: `patches[patch_offset_i + a·gw_i + b, c·p·p + r·p + s] =
/// (image_i[c, a·p + r, b·p + s] − mean_c) / std_c` (multiplied by `1/std_c` in f32, as the
/// reference does). `images` is `[total_pixels]`, `patches` is `[total_patches, 3·p·p]`.
pub fn patchify_f32(
    dev: &Device,
    packing: &PackedImages,
    table: &Buffer<i32>,
    images: &Buffer<f32>,
    patches: &mut Buffer<f32>,
    mean: [f32; 3],
    std: [f32; 3],
) -> Result<(), GpuError> {
    patchify(dev, packing, table, images, patches, mean, std)
}

/// [`patchify_f32`] writing bf16 patch rows (fp32 images and arithmetic).
pub fn patchify_bf16(
    dev: &Device,
    packing: &PackedImages,
    table: &Buffer<i32>,
    images: &Buffer<f32>,
    patches: &mut Buffer<bf16>,
    mean: [f32; 3],
    std: [f32; 3],
) -> Result<(), GpuError> {
    patchify(dev, packing, table, images, patches, mean, std)
}

/// `tokens[token_offset_i + t] = (t == 0 ? cls : patch_tokens[patch_offset_i + t − 1]) +
/// pos[token_offset_i + t]`, or without a class token (`cls` `None`, a packing of
/// [`PackedImages::with_class_tokens`] 0) `patch_tokens[patch_offset_i + t] + pos[...]`.
/// `patch_tokens` is `[total_patches, dim]` (the patch GEMM's output), `cls` is `[dim]`, `pos`
/// and `tokens` are `[total_tokens, dim]` (`pos` holds each image's position embedding
/// interpolated to its grid, packed like the tokens).
#[allow(clippy::too_many_arguments)]
pub fn assemble_tokens_f32(
    dev: &Device,
    packing: &PackedImages,
    table: &Buffer<i32>,
    patch_tokens: &Buffer<f32>,
    cls: Option<&Buffer<f32>>,
    pos: &Buffer<f32>,
    tokens: &mut Buffer<f32>,
    dim: usize,
) -> Result<(), GpuError> {
    assemble_tokens(dev, packing, table, patch_tokens, cls, pos, tokens, dim)
}

/// [`assemble_tokens_f32`] with bf16 patch tokens and tokens (fp32 `cls`, `pos` and sum).
#[allow(clippy::too_many_arguments)]
pub fn assemble_tokens_bf16(
    dev: &Device,
    packing: &PackedImages,
    table: &Buffer<i32>,
    patch_tokens: &Buffer<bf16>,
    cls: Option<&Buffer<f32>>,
    pos: &Buffer<f32>,
    tokens: &mut Buffer<bf16>,
    dim: usize,
) -> Result<(), GpuError> {
    assemble_tokens(dev, packing, table, patch_tokens, cls, pos, tokens, dim)
}

/// Backward of [`assemble_tokens_f32`] towards the patch GEMM:
/// `d_patch_tokens[patch_offset_i + n] = d_tokens[token_offset_i + c + n]`, `c` the packing's
/// class tokens (each image's CLS row has no pixel path).
pub fn tokens_to_patch_grads_f32(
    dev: &Device,
    packing: &PackedImages,
    table: &Buffer<i32>,
    d_tokens: &Buffer<f32>,
    d_patch_tokens: &mut Buffer<f32>,
    dim: usize,
) -> Result<(), GpuError> {
    tokens_to_patch_grads(dev, packing, table, d_tokens, d_patch_tokens, dim)
}

/// [`tokens_to_patch_grads_f32`] writing bf16 (round to nearest even): the fp32 gradient
/// gathered straight into the bf16 operand of the patch GEMM's input-gradient product.
pub fn tokens_to_patch_grads_f32_bf16out(
    dev: &Device,
    packing: &PackedImages,
    table: &Buffer<i32>,
    d_tokens: &Buffer<f32>,
    d_patch_tokens: &mut Buffer<bf16>,
    dim: usize,
) -> Result<(), GpuError> {
    tokens_to_patch_grads(dev, packing, table, d_tokens, d_patch_tokens, dim)
}

/// [`tokens_to_patch_grads_f32`] in bf16.
pub fn tokens_to_patch_grads_bf16(
    dev: &Device,
    packing: &PackedImages,
    table: &Buffer<i32>,
    d_tokens: &Buffer<bf16>,
    d_patch_tokens: &mut Buffer<bf16>,
    dim: usize,
) -> Result<(), GpuError> {
    tokens_to_patch_grads(dev, packing, table, d_tokens, d_patch_tokens, dim)
}

/// Backward of [`patchify_f32`]: `d_patches [total_patches, 3·p·p]` → `d_images
/// [total_pixels]`, planar and packed like the input, each pixel's gradient times `1/std_c`,
/// zero in the pixels beyond the last whole patch. Every element of `d_images` is written.
pub fn col2im_f32(
    dev: &Device,
    packing: &PackedImages,
    table: &Buffer<i32>,
    d_patches: &Buffer<f32>,
    d_images: &mut Buffer<f32>,
    std: [f32; 3],
) -> Result<(), GpuError> {
    col2im(dev, packing, table, d_patches, d_images, std)
}

/// [`col2im_f32`] from bf16 patch-row gradients (fp32 pixel gradients and arithmetic).
pub fn col2im_bf16(
    dev: &Device,
    packing: &PackedImages,
    table: &Buffer<i32>,
    d_patches: &Buffer<bf16>,
    d_images: &mut Buffer<f32>,
    std: [f32; 3],
) -> Result<(), GpuError> {
    col2im(dev, packing, table, d_patches, d_images, std)
}
