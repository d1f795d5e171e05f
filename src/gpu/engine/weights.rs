//! A model's weights on a device, linear layers in the engine's product precision. Shared by
//! the attack engine ([`super::GpuVit`]) and the evaluation targets (`crate::eval::gpu`), which
//! run the same blocks.

use super::Precision;
use crate::gpu::gemm::MatmulShape;
use crate::gpu::{Buffer, Device, GpuError};
use crate::model::{BlockWeights, LayerNormWeights, Linear};

/// A linear layer's weight `[out, in]`, in the product precision.
pub enum Weight {
    F32(Buffer<f32>),
    Bf16(Buffer<half::bf16>),
}

/// A linear layer on the device.
pub struct DeviceLinear {
    pub weight: Weight,
    pub bias: Option<Buffer<f32>>,
    /// The bias rounded to bf16, for the layers whose product writes bf16 (qkv and fc1, bf16
    /// weights only): the bias epilogue of a bf16-output product takes a bf16 bias.
    pub bias_bf16: Option<Buffer<half::bf16>>,
    pub out_features: usize,
    pub in_features: usize,
}

impl DeviceLinear {
    /// The product `x · Wᵀ` for `rows` rows of `x [rows, in]`.
    pub fn forward_shape(&self, rows: usize) -> MatmulShape {
        MatmulShape {
            m: rows,
            n: self.out_features,
            k: self.in_features,
            b_transposed: true,
        }
    }

    /// The input-gradient product `dy · W` for `rows` rows of `dy [rows, out]`.
    pub fn backward_shape(&self, rows: usize) -> MatmulShape {
        MatmulShape {
            m: rows,
            n: self.in_features,
            k: self.out_features,
            b_transposed: false,
        }
    }
}

pub struct DeviceLayerNorm {
    pub weight: Buffer<f32>,
    pub bias: Buffer<f32>,
}

/// One pre-LN transformer block on the device.
pub struct DeviceBlock {
    pub ln1: DeviceLayerNorm,
    pub qkv: DeviceLinear,
    pub out_proj: DeviceLinear,
    pub ln2: DeviceLayerNorm,
    pub fc1: DeviceLinear,
    pub fc2: DeviceLinear,
}

pub fn upload_linear(
    dev: &Device,
    l: &Linear,
    precision: Precision,
) -> Result<DeviceLinear, GpuError> {
    upload_linear_with(dev, l, precision, false)
}

/// [`upload_linear`], also keeping a bf16 copy of the bias when `bf16_bias` (and the weights
/// are bf16).
fn upload_linear_with(
    dev: &Device,
    l: &Linear,
    precision: Precision,
    bf16_bias: bool,
) -> Result<DeviceLinear, GpuError> {
    let weight = match precision {
        Precision::Fp32 => Weight::F32(dev.upload(&l.weight)?),
        Precision::Bf16 => Weight::Bf16(dev.upload(&to_bf16(&l.weight))?),
    };
    let bias_bf16 = match (&weight, &l.bias) {
        (Weight::Bf16(_), Some(b)) if bf16_bias => Some(dev.upload(&to_bf16(b))?),
        _ => None,
    };
    Ok(DeviceLinear {
        weight,
        bias: l.bias.as_ref().map(|b| dev.upload(b)).transpose()?,
        bias_bf16,
        out_features: l.out_features,
        in_features: l.in_features,
    })
}

pub fn upload_ln(dev: &Device, l: &LayerNormWeights) -> Result<DeviceLayerNorm, GpuError> {
    Ok(DeviceLayerNorm {
        weight: dev.upload(&l.weight)?,
        bias: dev.upload(&l.bias)?,
    })
}

pub fn upload_block(
    dev: &Device,
    b: &BlockWeights,
    precision: Precision,
) -> Result<DeviceBlock, GpuError> {
    Ok(DeviceBlock {
        ln1: upload_ln(dev, &b.ln1)?,
        qkv: upload_linear_with(dev, &b.qkv, precision, true)?,
        out_proj: upload_linear(dev, &b.out_proj, precision)?,
        ln2: upload_ln(dev, &b.ln2)?,
        fc1: upload_linear_with(dev, &b.fc1, precision, true)?,
        fc2: upload_linear(dev, &b.fc2, precision)?,
    })
}

/// Rounds to nearest even, as every bf16 conversion of the engine does.
fn to_bf16(v: &[f32]) -> Vec<half::bf16> {
    v.iter().map(|&x| half::bf16::from_f32(x)).collect()
}
