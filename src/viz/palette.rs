//! The fixed colour of every class index: the PASCAL VOC colour map (class 0 black, 1 dark red,
//! 2 dark green, ...), extended bit by bit to 2²⁴ distinct colours, so a class keeps its colour
//! across images, runs and targets.

/// The colour of class `class`.
pub fn class_colour(class: usize) -> [u8; 3] {
    let (mut r, mut g, mut b) = (0u8, 0u8, 0u8);
    let mut c = class;
    for j in 0..8 {
        r |= ((c & 1) as u8) << (7 - j);
        g |= (((c >> 1) & 1) as u8) << (7 - j);
        b |= (((c >> 2) & 1) as u8) << (7 - j);
        c >>= 3;
    }
    [r, g, b]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn voc_colours_and_distinct() {
        assert_eq!(class_colour(0), [0, 0, 0]);
        assert_eq!(class_colour(1), [128, 0, 0]);
        assert_eq!(class_colour(2), [0, 128, 0]);
        assert_eq!(class_colour(3), [128, 128, 0]);
        assert_eq!(class_colour(15), [192, 128, 128]);
        let mut seen = std::collections::HashSet::new();
        for c in 0..4096 {
            assert!(seen.insert(class_colour(c)), "class {c} repeats a colour");
        }
    }
}
