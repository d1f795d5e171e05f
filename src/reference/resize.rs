//! TEMPORARY interface placeholder; the real implementation lands from the `resize` branch.
use std::sync::Arc;
pub fn bicubic_resize(
    _input: &[f32],
    _c: usize,
    _ih: usize,
    _iw: usize,
    _oh: usize,
    _ow: usize,
) -> Vec<f32> {
    unimplemented!()
}
pub fn bicubic_resize_backward(
    _g: &[f32],
    _c: usize,
    _ih: usize,
    _iw: usize,
    _oh: usize,
    _ow: usize,
) -> Vec<f32> {
    unimplemented!()
}
pub fn interpolate_position_embedding(
    pos: &[f32],
    _dim: usize,
    _grid: usize,
    _gh: usize,
    _gw: usize,
) -> Vec<f32> {
    pos.to_vec()
}
pub fn scaled_size(h: usize, w: usize, ratio: f32) -> (usize, usize) {
    (((h as f32) * ratio) as usize, ((w as f32) * ratio) as usize)
}
pub struct PositionEmbeddingCache {
    pos: Arc<Vec<f32>>,
}
impl PositionEmbeddingCache {
    pub fn new(pos: Vec<f32>, _dim: usize, _grid: usize) -> Self {
        Self { pos: Arc::new(pos) }
    }
    pub fn get(&self, _gh: usize, _gw: usize) -> Arc<Vec<f32>> {
        self.pos.clone()
    }
}
