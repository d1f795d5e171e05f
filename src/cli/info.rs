//! `prm info`: what a model is, as the loader understood it.

use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use prm::gpu::kernels::attention::{check_head_layout, tensor_cores_run_heads, HEAD_DIM};
use prm::model::{Model, ModelSource, Pooling};

#[derive(Args)]
pub struct InfoArgs {
    /// A Hugging Face CLIP directory (sharded ones too) or hub id in the local cache
    /// (owner/name[@revision]), an OpenAI/open_clip .safetensors file, or
    /// random:ARCH
    #[arg(long)]
    model: String,
    /// Print one JSON object instead of text
    #[arg(long)]
    json: bool,
}

pub fn run(args: InfoArgs) -> anyhow::Result<ExitCode> {
    let model =
        Model::load(&args.model).with_context(|| format!("cannot load model '{}'", args.model))?;
    let c = &model.config;
    let (source, random) = match &model.source {
        ModelSource::HuggingFace { path } | ModelSource::OpenAi { path } => {
            (path.display().to_string(), false)
        }
        ModelSource::Random { arch, seed } => (format!("random:{arch}@{seed}"), true),
    };
    // Whether `--device cuda` / `sim` can run it (the attention kernels' head width).
    let gpu_engine = check_head_layout("vision tower", c.width, c.heads);
    if args.json {
        let v = serde_json::json!({
            "source": source,
            "format": model.source.format_name(),
            "weights_random": random,
            "config": c,
            "tokens_at_native_size": c.tokens(c.grid, c.grid),
            "class_token": c.class_token,
            "ln_pre": model.weights.ln_pre.is_some(),
            "image_embedding": model.image_embedding_unavailable().unwrap_or_else(|| "supported".to_string()),
            "parameters": model.parameter_count(),
            "fingerprint": model.fingerprint(),
            "gpu_engine": gpu_engine.as_ref().map_or_else(|e| e.clone(), |_| "supported".into()),
            "gpu_attention": match gpu_engine {
                Err(_) => "none",
                Ok(()) if tensor_cores_run_heads(c.width, c.heads) && c.head_dim() == HEAD_DIM => {
                    "tensor cores at bf16 (v3, v4), simt at fp32"
                }
                Ok(()) if tensor_cores_run_heads(c.width, c.heads) => {
                    "tensor cores at bf16 (v3), simt at fp32"
                }
                Ok(()) => "simt (fp32) at either precision",
            },
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("model:        {source}");
    println!("format:       {}", model.source.format_name());
    if random {
        println!("weights:      RANDOM (built-in architecture with seeded random weights; not a trained CLIP)");
    } else {
        println!("weights:      trained checkpoint");
    }
    println!(
        "fingerprint:  {} (run.json's `weights`)",
        model.fingerprint()
    );
    println!(
        "architecture: ViT, width {}, {} blocks, {} heads (head dim {}), MLP {}, patch {}",
        c.width,
        c.layers,
        c.heads,
        c.head_dim(),
        c.mlp,
        c.patch
    );
    println!(
        "input:        {0}x{0} pretrained ({1}x{1} grid, {2} tokens{3}); any size at native \
         resolution",
        c.image_size(),
        c.grid,
        c.tokens(c.grid, c.grid),
        if c.class_token {
            ""
        } else {
            ": the patches, no class token"
        }
    );
    match (c.embed_dim, c.pooling) {
        (Some(e), Pooling::AttentionHead) => println!(
            "embedding:    {e}, pooled by a learned attention head (SigLIP; --loss embed and \
             eval's zeroshot target read it; the dense targets, which project every patch, \
             are unavailable)"
        ),
        (None, Pooling::AttentionHead) => println!(
            "embedding:    none (the attention-pooling head is missing; --loss embed and the \
             eval targets on image embeddings unavailable)"
        ),
        (_, Pooling::Unpooled) => println!(
            "embedding:    none (no pooling head; --loss embed and the eval targets on image \
             embeddings unavailable)"
        ),
        (None, _) => {
            println!("embedding:    none (no visual projection; --loss embed unavailable)")
        }
        (Some(e), Pooling::ClassToken) => println!("embedding:    {e} (visual projection present)"),
        (Some(e), Pooling::PatchAverage | Pooling::NormedPatchAverage) => println!(
            "embedding:    {e}, pooled as the patch tokens' average (CLIPA; --loss embed and \
             eval's zeroshot target read it; the dense targets are unavailable)"
        ),
    }
    println!(
        "features:     F_0..F_{} ({} layers for the PRM loss){}",
        c.layers,
        c.feature_layers(),
        if model.weights.ln_pre.is_some() {
            ""
        } else {
            "; no LayerNorm before the blocks: F_0 is the embedded tokens"
        }
    );
    println!("activation:   {}", c.activation.name());
    println!("layer norm:   eps {:e}", c.ln_eps);
    println!("normalise:    mean {:?}, std {:?}", c.mean, c.std);
    println!(
        "parameters:   {} ({:.1} M)",
        model.parameter_count(),
        model.parameter_count() as f64 / 1e6
    );
    match &gpu_engine {
        Ok(()) if tensor_cores_run_heads(c.width, c.heads) && c.head_dim() == HEAD_DIM => {
            println!("gpu engine:   supported (--device cuda, sim)")
        }
        Ok(()) if tensor_cores_run_heads(c.width, c.heads) => println!(
            "gpu engine:   supported (--device cuda, sim); heads {} wide run attention v3 on \
             tensor cores at bf16 (v4 takes heads of 64)",
            c.head_dim()
        ),
        Ok(()) => println!(
            "gpu engine:   supported (--device cuda, sim); heads {} wide run the fp32 SIMT \
             attention kernels at either precision (the tensor-core ones take heads 64 to 128 \
             wide)",
            c.head_dim()
        ),
        Err(why) => println!("gpu engine:   not supported: {why}"),
    }
    Ok(ExitCode::SUCCESS)
}
