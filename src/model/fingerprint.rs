//! A fingerprint of what a vision tower computes: its configuration and every weight, as
//! loaded (f32), so the same weights give the same fingerprint from any file format or path,
//! and other weights at the same path another one.
//!
//! `run.json` records it, so that a resume is refused when the checkpoint it names now holds
//! other weights, and allowed when the same checkpoint was moved.
//!
//! A text tower has a fingerprint of its own ([`TextTower::fingerprint`]): `prm eval`'s report
//! names the tower that embedded the class names, which the vision fingerprint does not cover.

use xxhash_rust::xxh3::Xxh3;

use super::{BlockWeights, LayerNormWeights, Linear, Model, TextTower};

/// Bumped when what is hashed changes, so fingerprints of different definitions never agree.
const DEFINITION: &[u8] = b"prm vision tower fingerprint v1";

/// The text tower's definition: distinct from the vision tower's, so the two never agree.
const TEXT_DEFINITION: &[u8] = b"prm text tower fingerprint v1";

struct Fingerprinter(Xxh3);

impl Fingerprinter {
    fn count(&mut self, n: usize) {
        self.0.update(&(n as u64).to_le_bytes());
    }

    /// The length first, so that tensors cannot trade elements.
    fn floats(&mut self, v: &[f32]) {
        self.count(v.len());
        // Little-endian bytes on every target.
        #[cfg(target_endian = "little")]
        self.0.update(bytemuck::cast_slice(v));
        #[cfg(not(target_endian = "little"))]
        for x in v {
            self.0.update(&x.to_le_bytes());
        }
    }

    fn linear(&mut self, l: &Linear) {
        self.count(l.out_features);
        self.count(l.in_features);
        self.floats(&l.weight);
        match &l.bias {
            Some(b) => {
                self.count(1);
                self.floats(b);
            }
            None => self.count(0),
        }
    }

    fn layer_norm(&mut self, l: &LayerNormWeights) {
        self.floats(&l.weight);
        self.floats(&l.bias);
    }

    fn blocks(&mut self, blocks: &[BlockWeights]) {
        self.count(blocks.len());
        for b in blocks {
            self.layer_norm(&b.ln1);
            self.linear(&b.qkv);
            self.linear(&b.out_proj);
            self.layer_norm(&b.ln2);
            self.linear(&b.fc1);
            self.linear(&b.fc2);
        }
    }

    fn finish(self) -> String {
        format!("xxh3-128:{:032x}", self.0.digest128())
    }
}

impl Model {
    /// `xxh3-128:` and 32 hex digits over the configuration (sizes, activation, LayerNorm ε,
    /// pixel normalisation) and every weight of the vision tower, projection included. The
    /// text tower is not part of it: the attack never reads it. One pass over the weights (86 M
    /// floats for ViT-B/16; `prm info --model random:vit-b-16`, load included, takes 0.28 s on
    /// the 2-core dev VM).
    pub fn fingerprint(&self) -> String {
        let c = &self.config;
        let mut f = Fingerprinter(Xxh3::new());
        f.0.update(DEFINITION);
        for n in [c.width, c.layers, c.heads, c.patch, c.grid, c.mlp] {
            f.count(n);
        }
        f.count(c.embed_dim.map_or(0, |e| e + 1));
        f.0.update(c.activation.name().as_bytes());
        f.floats(&[c.ln_eps]);
        f.floats(&c.mean);
        f.floats(&c.std);
        let w = &self.weights;
        f.linear(&w.patch_embed);
        // A tower without a class token or LN_pre, or pooling otherwise, hashes a marker; every
        // other tower hashes what it always did, so fingerprints recorded before these options
        // existed still match.
        match &w.class_embedding {
            Some(cls) => f.floats(cls),
            None => f.0.update(b"no class token"),
        }
        f.floats(&w.position_embedding);
        match &w.ln_pre {
            Some(ln) => f.layer_norm(ln),
            None => f.0.update(b"no ln_pre"),
        }
        if c.pooling != crate::model::Pooling::ClassToken {
            f.0.update(c.pooling.name().as_bytes());
        }
        f.blocks(&w.blocks);
        f.layer_norm(&w.ln_post);
        match &w.projection {
            Some(p) => {
                f.count(1);
                f.linear(p);
            }
            None => f.count(0),
        }
        // Only towers with an attention-pooling head hash it, so no other fingerprint changes.
        if let Some(h) = &w.attention_head {
            f.0.update(b"attention pooling head");
            f.floats(&h.probe);
            f.linear(&h.in_proj);
            f.linear(&h.out_proj);
            f.layer_norm(&h.layer_norm);
            f.linear(&h.fc1);
            f.linear(&h.fc2);
        }
        f.finish()
    }
}

impl TextTower {
    /// `xxh3-128:` and 32 hex digits over the text tower's configuration (sizes, context,
    /// activation, LayerNorm ε) and every weight, as loaded: the same tower from any file
    /// format agrees. What embeds the class names of `prm eval`, so its report names it.
    pub fn fingerprint(&self) -> String {
        let c = &self.config;
        let mut f = Fingerprinter(Xxh3::new());
        f.0.update(TEXT_DEFINITION);
        for n in [
            c.width,
            c.layers,
            c.heads,
            c.mlp,
            c.vocab,
            c.context,
            c.embed_dim,
        ] {
            f.count(n);
        }
        f.0.update(c.activation.name().as_bytes());
        f.floats(&[c.ln_eps]);
        let w = &self.weights;
        f.floats(&w.token_embedding);
        f.floats(&w.position_embedding);
        f.blocks(&w.blocks);
        f.layer_norm(&w.ln_final);
        f.linear(&w.projection);
        f.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_weights_agree_and_any_change_is_seen() {
        let model = Model::load("random:tiny").unwrap();
        let print = model.fingerprint();
        assert!(
            print.starts_with("xxh3-128:") && print.len() == 9 + 32,
            "{print}"
        );
        assert_eq!(Model::load("random:tiny").unwrap().fingerprint(), print);
        assert_ne!(Model::load("random:tiny@1").unwrap().fingerprint(), print);
        let mut one_weight = model.clone();
        let last = one_weight.weights.blocks.last_mut().unwrap();
        last.fc2.weight[7] = f32::from_bits(last.fc2.weight[7].to_bits() ^ 1);
        assert_ne!(one_weight.fingerprint(), print);
        let mut eps = model.clone();
        eps.config.ln_eps *= 2.0;
        assert_ne!(eps.fingerprint(), print);
        let mut no_projection = model.clone();
        no_projection.weights.projection = None;
        assert_ne!(no_projection.fingerprint(), print);
    }

    #[test]
    fn a_text_tower_has_its_own_fingerprint_and_any_change_is_seen() {
        let tower = crate::model::random_text_tower("tiny", 0).unwrap();
        let print = tower.fingerprint();
        assert!(
            print.starts_with("xxh3-128:") && print.len() == 9 + 32,
            "{print}"
        );
        assert_eq!(
            crate::model::random_text_tower("tiny", 0)
                .unwrap()
                .fingerprint(),
            print
        );
        assert_ne!(
            crate::model::random_text_tower("tiny", 1)
                .unwrap()
                .fingerprint(),
            print
        );
        assert_ne!(Model::load("random:tiny").unwrap().fingerprint(), print);
        let mut one_weight = tower.clone();
        let first = &mut one_weight.weights.blocks[0].qkv.weight[3];
        *first = f32::from_bits(first.to_bits() ^ 1);
        assert_ne!(one_weight.fingerprint(), print);
        let mut token = tower.clone();
        token.weights.token_embedding[0] += 1.0;
        assert_ne!(token.fingerprint(), print);
        let mut context = tower.clone();
        context.config.context -= 1;
        assert_ne!(context.fingerprint(), print);
    }
}
