//! The loss-against-step plot of `prm attack --plot`, drawn with plotters' bitmap backend.
//!
//! [`LossCurves`] gathers the curves of a run in constant memory per step, however many images
//! it has: the per-step mean, minimum and maximum over images, and the whole curves of the first
//! [`LossCurves::SHOWN`] images. The plot shows the mean as a thick line over the min–max band,
//! with those first curves as thin lines. The same numbers go to a JSON file beside the plot.

use std::path::Path;

use plotters::prelude::*;

use super::font;
use super::palette::class_colour;
use super::VizError;

/// Per-step statistics of a run's loss curves.
#[derive(Clone, Debug)]
pub struct LossCurves {
    /// Points per curve: the loss before each of the `steps` steps, then the saved image's loss.
    pub points: usize,
    /// Images added.
    pub images: usize,
    pub mean: Vec<f64>,
    pub min: Vec<f64>,
    pub max: Vec<f64>,
    /// The first images' whole curves, `(relative path, curve)`.
    pub shown: Vec<(String, Vec<f64>)>,
    sum: Vec<f64>,
    count: Vec<usize>,
}

impl LossCurves {
    /// Whole curves kept for the plot.
    pub const SHOWN: usize = 8;

    /// Curves of a run of `steps` steps (`steps + 1` points each).
    pub fn new(steps: usize) -> Self {
        let points = steps + 1;
        LossCurves {
            points,
            images: 0,
            mean: vec![f64::NAN; points],
            min: vec![f64::INFINITY; points],
            max: vec![f64::NEG_INFINITY; points],
            shown: Vec::new(),
            sum: vec![0.0; points],
            count: vec![0; points],
        }
    }

    /// Adds image `rel`'s curve. Non-finite values are left out of the statistics.
    pub fn add(&mut self, rel: &str, curve: &[f64]) {
        self.images += 1;
        for (k, &v) in curve.iter().enumerate().take(self.points) {
            if v.is_finite() {
                self.sum[k] += v;
                self.count[k] += 1;
                self.min[k] = self.min[k].min(v);
                self.max[k] = self.max[k].max(v);
                self.mean[k] = self.sum[k] / self.count[k] as f64;
            }
        }
        if self.shown.len() < Self::SHOWN {
            self.shown.push((rel.to_string(), curve.to_vec()));
        }
    }

    /// The range of every finite value, or `None` when there is none.
    fn value_range(&self) -> Option<(f64, f64)> {
        let (lo, hi) = self
            .min
            .iter()
            .chain(&self.max)
            .filter(|v| v.is_finite())
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
        (lo <= hi).then_some((lo, hi))
    }
}

/// Width and height of the plot in pixels.
pub const PLOT_SIZE: (u32, u32) = (960, 600);

/// Draws `curves` under `title`: returns (width, height, interleaved RGB).
pub fn render_loss_plot(
    curves: &LossCurves,
    title: &str,
) -> Result<(usize, usize, Vec<u8>), VizError> {
    let (w, h) = PLOT_SIZE;
    let mut buf = vec![255u8; 3 * (w * h) as usize];
    let err = |e: &dyn std::fmt::Display| VizError::draw("the loss plot", e);
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let (lo, hi) = curves.value_range().unwrap_or((0.0, 1.0));
        let pad = ((hi - lo) * 0.05).max(1e-6 * hi.abs().max(1.0));
        // Steps are whole numbers; a one-point run (zero steps) is centred.
        let (x0, x1) = if curves.points == 1 {
            (-1.0, 1.0)
        } else {
            (0.0, (curves.points - 1) as f64)
        };
        let mut chart = ChartBuilder::on(&root)
            .caption(title, font::style(18))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(72)
            .build_cartesian_2d(x0..x1, (lo - pad)..(hi + pad))
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_labels(curves.points.clamp(3, 11))
            .x_label_formatter(&|v: &f64| {
                if (v - v.round()).abs() < 1e-9 {
                    format!("{v:.0}")
                } else {
                    String::new()
                }
            })
            .x_desc("step (last point: the saved image)")
            .y_desc("loss")
            .label_style(font::style(13))
            .axis_desc_style(font::style(15))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(|e| err(&e))?;
        let finite = |k: usize, v: f64| v.is_finite().then_some((k as f64, v));
        // The min–max band: the max curve forward, the min curve back.
        let band: Vec<(f64, f64)> = (0..curves.points)
            .filter_map(|k| finite(k, curves.max[k]))
            .chain(
                (0..curves.points)
                    .rev()
                    .filter_map(|k| finite(k, curves.min[k])),
            )
            .collect();
        if curves.images > 1 && band.len() > 2 {
            chart
                .draw_series(std::iter::once(Polygon::new(
                    band,
                    RGBColor(70, 110, 200).mix(0.18).filled(),
                )))
                .map_err(|e| err(&e))?
                .label("min–max over images")
                .legend(|(x, y)| {
                    Rectangle::new(
                        [(x, y - 5), (x + 18, y + 5)],
                        RGBColor(70, 110, 200).mix(0.18).filled(),
                    )
                });
        }
        for (i, (rel, curve)) in curves.shown.iter().enumerate() {
            let [r, g, b] = class_colour(i + 1);
            let colour = RGBColor(r, g, b);
            chart
                .draw_series(LineSeries::new(
                    curve.iter().enumerate().filter_map(|(k, &v)| finite(k, v)),
                    colour.stroke_width(1),
                ))
                .map_err(|e| err(&e))?
                .label(rel.clone())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], colour));
        }
        if curves.images > 1 {
            chart
                .draw_series(LineSeries::new(
                    curves
                        .mean
                        .iter()
                        .enumerate()
                        .filter_map(|(k, &v)| finite(k, v)),
                    BLACK.stroke_width(3),
                ))
                .map_err(|e| err(&e))?
                .label(format!("mean of {} images", curves.images))
                .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLACK.stroke_width(3)));
        }
        // Curves of one point (a zero-step run) are markers, not lines.
        if curves.points == 1 {
            let markers = curves
                .shown
                .iter()
                .enumerate()
                .map(|(i, (_, c))| (c[0], class_colour(i + 1), 4))
                .chain(std::iter::once((curves.mean[0], [0, 0, 0], 6)));
            chart
                .draw_series(
                    markers
                        .filter(|m| m.0.is_finite())
                        .map(|(v, [r, g, b], size)| {
                            Circle::new((0.0, v), size, RGBColor(r, g, b).filled())
                        }),
                )
                .map_err(|e| err(&e))?;
        }
        chart
            .configure_series_labels()
            .label_font(font::style(12))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(180, 180, 180))
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    Ok((w as usize, h as usize, buf))
}

/// Draws the plot to `path` (PNG) and writes its numbers to `path` with extension `.json`,
/// both atomically.
pub fn write_loss_plot(path: &Path, curves: &LossCurves, title: &str) -> Result<(), VizError> {
    let (w, h, rgb) = render_loss_plot(curves, title)?;
    crate::io::write_png_atomic(path, w, h, &rgb)?;
    let json = serde_json::json!({
        "title": title,
        "points": curves.points,
        "images": curves.images,
        "note": "point k < points-1 is the loss before step k (at that step's working geometry; \
                 an escape step shows the start's loss); the last point is the saved image's loss",
        "mean": nan_to_null(&curves.mean),
        "min": nan_to_null(&curves.min),
        "max": nan_to_null(&curves.max),
        "shown": curves.shown.iter().map(|(rel, c)| serde_json::json!({"image": rel, "loss": nan_to_null(c)})).collect::<Vec<_>>(),
    });
    let text = serde_json::to_string_pretty(&json).expect("JSON serialises") + "\n";
    let json_path = path.with_extension("json");
    crate::io::output::write_atomic(&json_path, |file| {
        use std::io::Write;
        file.write_all(text.as_bytes())
            .map_err(|source| crate::io::IoError::Write {
                path: json_path.clone(),
                source,
            })
    })?;
    Ok(())
}

fn nan_to_null(v: &[f64]) -> Vec<Option<f64>> {
    v.iter().map(|&x| x.is_finite().then_some(x)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_over_images() {
        let mut c = LossCurves::new(2);
        c.add("a", &[3.0, 2.0, 1.0]);
        c.add("b", &[5.0, f64::NAN, 3.0]);
        assert_eq!(c.images, 2);
        assert_eq!(c.mean, vec![4.0, 2.0, 2.0]);
        assert_eq!(c.min, vec![3.0, 2.0, 1.0]);
        assert_eq!(c.max, vec![5.0, 2.0, 3.0]);
        assert_eq!(c.shown.len(), 2);
        let (w, h, px) = render_loss_plot(&c, "test").unwrap();
        assert_eq!(px.len(), 3 * w * h);
        assert!(px.iter().any(|&v| v < 100), "something dark is drawn");
    }
}
