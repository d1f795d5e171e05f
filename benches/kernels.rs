//! Per-kernel GPU benches at the pgd workload's shapes (ViT-B/16, 224 px, batch 64: 12,608
//! tokens, width 768, MLP 3072), with fresh random inputs. Each iteration launches the kernel
//! and synchronises, so the time includes one launch latency (a few µs against 20–600 µs).
//! Without a CUDA device every bench is skipped with a message (the simulator's timings say
//! nothing about a GPU).
//!
//! Run: `cargo bench --bench kernels` (on a GPU machine; add a filter such as `-- attention`).
//! The attention group times the SIMT fp32 kernels, tensor-core v2 (`attention_tc.cu`), v3
//! (`attention_tc3.cu`) and v4 (`attention_tc4.cu`) on the same inputs: `cargo bench --bench
//! kernels -- attention`. The last group times `prm eval`'s cosine logits (`class_logits.cu`).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use prm::gpu::gemm::{matmul_bf16, MatmulShape};
use prm::gpu::kernels::activation::bias_activation_forward_f32_bf16out;
use prm::gpu::kernels::attention::*;
use prm::gpu::kernels::class_logits::{class_logits_f32, normalize_rows_f32};
use prm::gpu::kernels::layernorm::{
    layernorm_backward_f32, layernorm_backward_f32_bf16copy, layernorm_forward_f32_bf16out,
};
use prm::gpu::{Buffer, Device};
use prm::model::Activation;
use prm::rng::{ImageRng, STREAM_INIT};

const IMAGES: usize = 64;
const TOKENS: usize = 197;
const WIDTH: usize = 768;
const MLP: usize = 3072;

fn random(dev: &Device, n: usize, seed: &str) -> Buffer<f32> {
    let rng = ImageRng::new(0, seed);
    let v: Vec<f32> = (0..n)
        .map(|i| 2.0 * rng.uniform(STREAM_INIT, i as u64) - 1.0)
        .collect();
    dev.upload(&v).expect("upload")
}

fn kernels(c: &mut Criterion) {
    if !Device::cuda_available() {
        println!("skipped: no CUDA device (kernel benches only mean something on a GPU)");
        return;
    }
    let dev = Device::cuda(0).expect("CUDA device 0");
    let n = IMAGES * TOKENS;
    let lens = vec![TOKENS; IMAGES];
    let cu: Vec<i32> = (0..=IMAGES).map(|i| (i * TOKENS) as i32).collect();
    let cu = dev.upload(&cu).unwrap();
    let qkv = random(&dev, n * 3 * WIDTH, "qkv");
    let d_out = random(&dev, n * WIDTH, "dout");
    let mut out = dev.alloc::<f32>(n * WIDTH).unwrap();
    let mut lse = dev
        .alloc::<f32>(attention_stats_len(n, WIDTH / 64))
        .unwrap();
    let mut delta = dev
        .alloc::<f32>(attention_stats_len(n, WIDTH / 64))
        .unwrap();
    let mut d_qkv = dev.alloc::<f32>(n * 3 * WIDTH).unwrap();
    let mut g = c.benchmark_group("attention 64x197 tokens, width 768");
    g.sample_size(20);
    // Criterion's "elements" are FLOP here, so its elem/s reads as FLOP/s: one T×T×64 product
    // per head and image is 2·T²·64 FLOP; the forward forms 2 (S, P·V), the backward 7 by
    // recomputation (dK/dV: S, dP, dV, dK; dQ: S, dP, dQ); the same count for every version.
    let product_flop = (2 * TOKENS * TOKENS * 64 * (WIDTH / 64) * IMAGES) as u64;
    let (forward_flop, backward_flop) = (2 * product_flop, 7 * product_flop);
    for (name, tc) in [("simt fp32", false), ("tensor cores v2 bf16", true)] {
        let forward = if tc {
            attention_forward_tc
        } else {
            attention_forward_f32
        };
        let backward = if tc {
            attention_backward_tc
        } else {
            attention_backward_f32
        };
        g.throughput(Throughput::Elements(forward_flop));
        g.bench_function(format!("forward {name}"), |b| {
            b.iter(|| {
                forward(
                    &dev,
                    &qkv,
                    &cu,
                    &lens,
                    &mut out,
                    &mut lse,
                    WIDTH,
                    WIDTH / 64,
                    AttentionMode::QK,
                    false,
                )
                .unwrap();
                dev.synchronize().unwrap();
            })
        });
        g.throughput(Throughput::Elements(backward_flop));
        g.bench_function(format!("backward {name}"), |b| {
            b.iter(|| {
                backward(
                    &dev,
                    &qkv,
                    &out,
                    &d_out,
                    &lse,
                    &cu,
                    &lens,
                    &mut d_qkv,
                    &mut delta,
                    WIDTH,
                    WIDTH / 64,
                    AttentionMode::QK,
                    false,
                )
                .unwrap();
                dev.synchronize().unwrap();
            })
        });
    }
    // v3 (kernels/attention_tc3.cu): bf16 q/k/v in, bf16 context and d_qkv out. Their options
    // (same bits either way) from PRM_ATTENTION_STRAIGHT, _DELTA_IN_DQ and _SPLIT.
    let options = TcOptions::from_env();
    let qkv_bf16: Vec<half::bf16> = dev
        .download(&qkv)
        .unwrap()
        .into_iter()
        .map(half::bf16::from_f32)
        .collect();
    let qkv_bf16 = dev.upload(&qkv_bf16).unwrap();
    let mut out_bf16 = dev.alloc::<half::bf16>(n * WIDTH).unwrap();
    let mut d_out_bf16 = dev.alloc::<half::bf16>(n * WIDTH).unwrap();
    let mut d_qkv_bf16 = dev.alloc::<half::bf16>(n * 3 * WIDTH).unwrap();
    g.throughput(Throughput::Elements(forward_flop));
    g.bench_function("forward tensor cores v3 bf16", |b| {
        b.iter(|| {
            attention_forward_tc3(
                &dev,
                &qkv_bf16,
                &cu,
                &lens,
                &mut out_bf16,
                &mut lse,
                WIDTH,
                WIDTH / 64,
                AttentionMode::QK,
                false,
                options,
            )
            .unwrap();
            dev.synchronize().unwrap();
        })
    });
    g.throughput(Throughput::Elements(backward_flop));
    g.bench_function("backward tensor cores v3 bf16", |b| {
        b.iter(|| {
            attention_backward_tc3(
                &dev,
                &qkv_bf16,
                &out_bf16,
                &d_out,
                &lse,
                &cu,
                &lens,
                &mut d_qkv_bf16,
                &mut delta,
                &mut d_out_bf16,
                WIDTH,
                WIDTH / 64,
                AttentionMode::QK,
                false,
                options,
            )
            .unwrap();
            dev.synchronize().unwrap();
        })
    });
    // The engine's path: dO arrives in bf16 from the out-projection's product.
    g.bench_function("backward tensor cores v3 bf16, bf16 dO", |b| {
        b.iter(|| {
            attention_backward_tc3_bf16_dout(
                &dev,
                &qkv_bf16,
                &out_bf16,
                &d_out_bf16,
                &lse,
                &cu,
                &lens,
                &mut d_qkv_bf16,
                &mut delta,
                WIDTH,
                WIDTH / 64,
                AttentionMode::QK,
                false,
                options,
            )
            .unwrap();
            dev.synchronize().unwrap();
        })
    });
    // v4 (kernels/attention_tc4.cu): v3's results with a whole head resident in shared memory.
    g.throughput(Throughput::Elements(forward_flop));
    g.bench_function("forward tensor cores v4 bf16", |b| {
        b.iter(|| {
            attention_forward_tc4(
                &dev,
                &qkv_bf16,
                &cu,
                &lens,
                &mut out_bf16,
                &mut lse,
                WIDTH,
                WIDTH / 64,
                AttentionMode::QK,
                false,
                options,
            )
            .unwrap();
            dev.synchronize().unwrap();
        })
    });
    g.throughput(Throughput::Elements(backward_flop));
    g.bench_function("backward tensor cores v4 bf16, bf16 dO", |b| {
        b.iter(|| {
            attention_backward_tc4_bf16_dout(
                &dev,
                &qkv_bf16,
                &out_bf16,
                &d_out_bf16,
                &lse,
                &cu,
                &lens,
                &mut d_qkv_bf16,
                &mut delta,
                WIDTH,
                WIDTH / 64,
                AttentionMode::QK,
                false,
                options,
            )
            .unwrap();
            dev.synchronize().unwrap();
        })
    });
    g.finish();

    let mut g = c.benchmark_group("row-wise 12608 tokens");
    g.sample_size(20);
    let x = random(&dev, n * WIDTH, "x");
    let gamma = random(&dev, WIDTH, "gamma");
    let beta = random(&dev, WIDTH, "beta");
    let (mut mean, mut rstd) = (dev.alloc::<f32>(n).unwrap(), dev.alloc::<f32>(n).unwrap());
    let mut yb = dev.alloc::<half::bf16>(n * MLP).unwrap();
    // Throughput in bytes each kernel must move at least (criterion prints GB/s).
    g.throughput(Throughput::Bytes((n * WIDTH * 6) as u64));
    g.bench_function("layernorm forward, bf16 out (768)", |b| {
        b.iter(|| {
            layernorm_forward_f32_bf16out(
                &dev, &x, &gamma, &beta, &mut yb, &mut mean, &mut rstd, n, WIDTH, 1e-5,
            )
            .unwrap();
            dev.synchronize().unwrap();
        })
    });
    // LayerNorm backward as the engine runs it: accumulating into the residual gradient (reads
    // x, dy and dx, writes dx), and in bf16 also writing dx's bf16 copy.
    let dy = random(&dev, n * WIDTH, "dy");
    let mut dx = random(&dev, n * WIDTH, "dx");
    let mut dx_bf16 = dev.alloc::<half::bf16>(n * WIDTH).unwrap();
    let elements = (n * WIDTH) as u64;
    g.throughput(Throughput::Bytes(elements * 16));
    g.bench_function("layernorm backward, accumulate (768)", |b| {
        b.iter(|| {
            layernorm_backward_f32(&dev, &x, &dy, &gamma, &mean, &rstd, &mut dx, n, WIDTH, true)
                .unwrap();
            dev.synchronize().unwrap();
        })
    });
    g.throughput(Throughput::Bytes(elements * 18));
    g.bench_function("layernorm backward, accumulate + bf16 copy (768)", |b| {
        b.iter(|| {
            layernorm_backward_f32_bf16copy(
                &dev,
                &x,
                &dy,
                &gamma,
                &mean,
                &rstd,
                &mut dx,
                &mut dx_bf16,
                n,
                WIDTH,
                true,
            )
            .unwrap();
            dev.synchronize().unwrap();
        })
    });
    let h = random(&dev, n * MLP, "h");
    let bias = random(&dev, MLP, "bias");
    let mut pre = dev.alloc::<f32>(n * MLP).unwrap();
    g.throughput(Throughput::Bytes((n * MLP * 10) as u64));
    g.bench_function("QuickGELU + bias forward, bf16 out (3072)", |b| {
        b.iter(|| {
            bias_activation_forward_f32_bf16out(
                &dev,
                Activation::QuickGelu,
                &h,
                Some(&bias),
                Some(&mut pre),
                &mut yb,
                n,
                MLP,
            )
            .unwrap();
            dev.synchronize().unwrap();
        })
    });
    g.finish();

    let mut g = c.benchmark_group("cuBLASLt bf16 products, 12608 rows");
    g.sample_size(20);
    // Random weights: zeros would let every answer tie on the bits and run at zeros' power.
    let w: Vec<half::bf16> = (0..MLP * WIDTH)
        .map(|i| half::bf16::from_f32(((i * 7919 % 2001) as f32 - 1000.0) / 1000.0))
        .collect();
    let w = dev.upload(&w).unwrap();
    let mut c_out = dev.alloc::<f32>(n * MLP).unwrap();
    // Each with cuBLASLt's first answer and under PRM_PRODUCTS=timed (the fastest of its first
    // answers with the same bits; the tuning runs in criterion's warm-up).
    for timed in [false, true] {
        dev.set_timed_products(timed);
        for (name, nn, k) in [
            ("qkv (768 -> 2304)", 3 * WIDTH, WIDTH),
            ("out_proj (768 -> 768)", WIDTH, WIDTH),
            ("fc1 (768 -> 3072)", MLP, WIDTH),
            ("fc2 (3072 -> 768)", WIDTH, MLP),
        ] {
            let shape = MatmulShape {
                m: n,
                n: nn,
                k,
                b_transposed: true,
            };
            let how = if timed { "timed" } else { "heuristic" };
            g.bench_function(format!("{name}, {how}"), |b| {
                b.iter(|| {
                    matmul_bf16(&dev, shape, &yb, &w, None, &mut c_out, false).unwrap();
                    dev.synchronize().unwrap();
                })
            });
        }
    }
    dev.set_timed_products(false);
    for t in dev.product_tunings() {
        println!("{}", prm::gpu::product_timing::describe(&t));
    }
    g.finish();

    // `prm eval`'s MaskCLIP logits: 32 images at 448 px (784 patches each), ViT-B/16's
    // 512-wide projection, ADE20K's 150 classes; f64 sums, the host's bits.
    let (rows, classes, dim) = (32 * 784, 150, 512);
    let mut g = c.benchmark_group("eval cosine logits, 25088 rows x 150 classes, 512 wide");
    g.throughput(Throughput::Elements((rows * classes) as u64));
    let mut x = random(&dev, rows * dim, "eval rows");
    normalize_rows_f32(&dev, &mut x, rows, dim).unwrap();
    let mut class_rows = random(&dev, classes * dim, "eval classes");
    normalize_rows_f32(&dev, &mut class_rows, classes, dim).unwrap();
    let mut logits = dev.alloc::<f32>(rows * classes).unwrap();
    g.bench_function("normalize rows", |b| {
        b.iter(|| {
            normalize_rows_f32(&dev, &mut x, rows, dim).unwrap();
            dev.synchronize().unwrap();
        })
    });
    g.bench_function("class logits", |b| {
        b.iter(|| {
            class_logits_f32(&dev, &x, &class_rows, rows, classes, dim, &mut logits).unwrap();
            dev.synchronize().unwrap();
        })
    });
    g.finish();
}

criterion_group!(benches, kernels);
criterion_main!(benches);
