//! Segmentation and classification metrics.
//!
//! Segmentation uses one confusion matrix `[C, C]` (rows: reference, columns: prediction),
//! summed over all images of a run. Pixels whose reference equals the ignore index are not
//! counted. Per class c: `IoU_c = TP / (TP + FP + FN)` for classes whose union
//! `TP + FP + FN` is non-empty; classes absent from both the reference and the prediction have no
//! IoU and do not enter the mean.
//! - mIoU: the mean of the defined IoUs;
//! - pixel accuracy: `Σ TP / counted pixels`;
//! - fwIoU: `Σ_c (reference pixels of c / counted pixels) · IoU_c` over classes with an IoU.
//!
//! The adversarial-vs-clean comparison uses the clean prediction as the reference (nothing is
//! ignored there: every pixel has a clean prediction).

use serde::Serialize;

/// A `[C, C]` confusion matrix, rows = reference class, columns = predicted class.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Confusion {
    pub classes: usize,
    pub counts: Vec<u64>,
}

/// What [`Confusion::add`] found wrong with a label map.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    #[error("label maps differ in size ({reference} reference pixels, {prediction} predicted)")]
    Size { reference: usize, prediction: usize },
    #[error("label value {value} at pixel {pixel} is not a class index below {classes} nor the ignore index {ignore}")]
    OutOfRange {
        value: u32,
        pixel: usize,
        classes: usize,
        ignore: u32,
    },
}

/// The summary numbers of a confusion matrix.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SegScores {
    /// `None` when no class has a non-empty union (no counted pixel).
    pub miou: Option<f64>,
    pub pixel_accuracy: Option<f64>,
    pub fwiou: Option<f64>,
    /// Per class; `None` where the union is empty.
    pub iou: Vec<Option<f64>>,
    pub pixels: u64,
}

impl Confusion {
    pub fn new(classes: usize) -> Self {
        Confusion {
            classes,
            counts: vec![0; classes * classes],
        }
    }

    /// Adds one image: `reference` and `prediction` of equal length; reference pixels equal to
    /// `ignore` are skipped. Predictions must be class indices.
    pub fn add(
        &mut self,
        reference: &[u32],
        prediction: &[u32],
        ignore: Option<u32>,
    ) -> Result<(), LabelError> {
        if reference.len() != prediction.len() {
            return Err(LabelError::Size {
                reference: reference.len(),
                prediction: prediction.len(),
            });
        }
        let c = self.classes;
        // Validate first, so a bad map adds nothing.
        for (i, (&r, &p)) in reference.iter().zip(prediction).enumerate() {
            if Some(r) == ignore {
                continue;
            }
            for v in [r, p] {
                if v as usize >= c {
                    return Err(LabelError::OutOfRange {
                        value: v,
                        pixel: i,
                        classes: c,
                        ignore: ignore.unwrap_or(u32::MAX),
                    });
                }
            }
        }
        for (&r, &p) in reference.iter().zip(prediction) {
            if Some(r) == ignore {
                continue;
            }
            self.counts[r as usize * c + p as usize] += 1;
        }
        Ok(())
    }

    pub fn merge(&mut self, other: &Confusion) {
        assert_eq!(self.classes, other.classes);
        self.counts
            .iter_mut()
            .zip(&other.counts)
            .for_each(|(a, b)| *a += b);
    }

    pub fn scores(&self) -> SegScores {
        let c = self.classes;
        let total: u64 = self.counts.iter().sum();
        let mut iou = Vec::with_capacity(c);
        let (mut sum, mut n, mut fw, mut tp_all) = (0.0f64, 0usize, 0.0f64, 0u64);
        for k in 0..c {
            let tp = self.counts[k * c + k];
            let row: u64 = self.counts[k * c..(k + 1) * c].iter().sum();
            let col: u64 = (0..c).map(|r| self.counts[r * c + k]).sum();
            let union = row + col - tp;
            tp_all += tp;
            if union == 0 {
                iou.push(None);
                continue;
            }
            let v = tp as f64 / union as f64;
            iou.push(Some(v));
            sum += v;
            n += 1;
            fw += row as f64 / total as f64 * v;
        }
        SegScores {
            miou: (n > 0).then(|| sum / n as f64),
            pixel_accuracy: (total > 0).then(|| tp_all as f64 / total as f64),
            fwiou: (total > 0).then_some(fw),
            iou,
            pixels: total,
        }
    }
}

/// Top-1 accuracy of predictions against labels, over the pairs that have a label.
pub fn top1(pred: &[usize], labels: &[Option<usize>]) -> Option<f64> {
    let pairs: Vec<(usize, usize)> = pred
        .iter()
        .zip(labels)
        .filter_map(|(&p, l)| l.map(|l| (p, l)))
        .collect();
    (!pairs.is_empty())
        .then(|| pairs.iter().filter(|(p, l)| p == l).count() as f64 / pairs.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_made_matrix() {
        // 3 classes; class 2 absent from reference and prediction.
        // reference: 0 0 0 1 1 255   prediction: 0 0 1 1 0 2
        let mut m = Confusion::new(3);
        m.add(&[0, 0, 0, 1, 1, 255], &[0, 0, 1, 1, 0, 2], Some(255))
            .unwrap();
        assert_eq!(m.counts, vec![2, 1, 0, 1, 1, 0, 0, 0, 0]);
        let s = m.scores();
        // class 0: tp 2, fp 1, fn 1 → 0.5; class 1: tp 1, fp 1, fn 1 → 1/3; class 2: none
        assert_eq!(s.iou[0], Some(0.5));
        assert!((s.iou[1].unwrap() - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(s.iou[2], None);
        assert!((s.miou.unwrap() - (0.5 + 1.0 / 3.0) / 2.0).abs() < 1e-12);
        assert!((s.pixel_accuracy.unwrap() - 3.0 / 5.0).abs() < 1e-12);
        // fw: class 0 has 3/5 of reference pixels, class 1 2/5
        assert!((s.fwiou.unwrap() - (0.6 * 0.5 + 0.4 / 3.0)).abs() < 1e-12);
        assert_eq!(s.pixels, 5);
    }

    #[test]
    fn class_only_predicted_counts_with_zero_iou() {
        let mut m = Confusion::new(3);
        m.add(&[0, 0], &[0, 2], None).unwrap();
        let s = m.scores();
        assert_eq!(s.iou, vec![Some(0.5), None, Some(0.0)]);
        assert!((s.miou.unwrap() - 0.25).abs() < 1e-12);
    }

    #[test]
    fn all_ignored_has_no_scores() {
        let mut m = Confusion::new(2);
        m.add(&[255, 255], &[0, 1], Some(255)).unwrap();
        let s = m.scores();
        assert_eq!(s.miou, None);
        assert_eq!(s.pixel_accuracy, None);
        assert_eq!(s.pixels, 0);
    }

    #[test]
    fn out_of_range_labels_are_refused_and_add_nothing() {
        let mut m = Confusion::new(2);
        let e = m.add(&[0, 7], &[0, 1], Some(255)).unwrap_err();
        assert!(matches!(
            e,
            LabelError::OutOfRange {
                value: 7,
                pixel: 1,
                ..
            }
        ));
        assert!(m.counts.iter().all(|&c| c == 0));
        assert!(m.add(&[0], &[0, 1], None).is_err());
    }

    #[test]
    fn matrices_sum_over_images() {
        let mut a = Confusion::new(2);
        a.add(&[0, 1], &[0, 1], None).unwrap();
        let mut b = Confusion::new(2);
        b.add(&[1, 1], &[0, 1], None).unwrap();
        a.merge(&b);
        assert_eq!(a.counts, vec![1, 0, 1, 2]);
        let s = a.scores();
        assert!((s.miou.unwrap() - (0.5 + 2.0 / 3.0) / 2.0).abs() < 1e-12);
    }

    #[test]
    fn top1_counts_labelled_only() {
        assert_eq!(top1(&[1, 2, 3], &[Some(1), None, Some(0)]), Some(0.5));
        assert_eq!(top1(&[1], &[None]), None);
    }
}
