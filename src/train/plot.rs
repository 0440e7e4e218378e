//! `rlhf plot RUN_DIR`: one PNG with a panel per metric of `metrics.jsonl` against the step (the
//! iteration, for PPO and GRPO). A small raster renderer (lines, axes, a 3×5 pixel font for titles
//! and tick values), so plotting needs no system fonts or graphics libraries.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::model::weights::write_atomic;

const PANEL_W: usize = 420;
const PANEL_H: usize = 240;
const COLS: usize = 2;
const MARGIN_L: usize = 64;
const MARGIN_R: usize = 16;
const MARGIN_T: usize = 28;
const MARGIN_B: usize = 28;

/// Glyphs of 3 columns × 5 rows, one row per entry, bit 2 leftmost.
fn glyph(c: char) -> Option<[u8; 5]> {
    Some(match c.to_ascii_uppercase() {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        '+' => [0, 2, 7, 2, 0],
        '/' => [1, 1, 2, 4, 4],
        '_' => [0, 0, 0, 0, 7],
        ':' => [0, 2, 0, 2, 0],
        '%' => [5, 1, 2, 4, 5],
        '(' => [1, 2, 2, 2, 1],
        ')' => [4, 2, 2, 2, 4],
        ' ' => [0, 0, 0, 0, 0],
        'A' => [2, 5, 7, 5, 5],
        'B' => [6, 5, 6, 5, 6],
        'C' => [3, 4, 4, 4, 3],
        'D' => [6, 5, 5, 5, 6],
        'E' => [7, 4, 6, 4, 7],
        'F' => [7, 4, 6, 4, 4],
        'G' => [3, 4, 5, 5, 3],
        'H' => [5, 5, 7, 5, 5],
        'I' => [7, 2, 2, 2, 7],
        'J' => [1, 1, 1, 5, 2],
        'K' => [5, 5, 6, 5, 5],
        'L' => [4, 4, 4, 4, 7],
        'M' => [5, 7, 7, 5, 5],
        'N' => [6, 5, 5, 5, 5],
        'O' => [2, 5, 5, 5, 2],
        'P' => [6, 5, 6, 4, 4],
        'Q' => [2, 5, 5, 6, 3],
        'R' => [6, 5, 6, 5, 5],
        'S' => [3, 4, 2, 1, 6],
        'T' => [7, 2, 2, 2, 2],
        'U' => [5, 5, 5, 5, 7],
        'V' => [5, 5, 5, 5, 2],
        'W' => [5, 5, 7, 7, 5],
        'X' => [5, 5, 2, 5, 5],
        'Y' => [5, 5, 2, 2, 2],
        'Z' => [7, 1, 2, 4, 7],
        _ => return None,
    })
}

struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Canvas {
        Canvas {
            w,
            h,
            px: vec![255; w * h * 3],
        }
    }

    fn set(&mut self, x: i64, y: i64, rgb: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            let i = (y as usize * self.w + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&rgb);
        }
    }

    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), rgb: [u8; 3]) {
        let steps = (x1 - x0).abs().max((y1 - y0).abs()).ceil().max(1.0) as usize;
        for s in 0..=steps {
            let t = s as f64 / steps as f64;
            let (x, y) = (x0 + t * (x1 - x0), y0 + t * (y1 - y0));
            self.set(x.round() as i64, y.round() as i64, rgb);
            self.set(x.round() as i64, y.round() as i64 + 1, rgb);
        }
    }

    /// Text at 2× scale, top-left at (x, y); characters without a glyph become spaces.
    fn text(&mut self, x: usize, y: usize, s: &str, rgb: [u8; 3]) {
        for (k, c) in s.chars().enumerate() {
            let g = glyph(c).unwrap_or([0; 5]);
            for (row, bits) in g.iter().enumerate() {
                for col in 0..3 {
                    if bits & (4 >> col) != 0 {
                        for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                            self.set(
                                (x + k * 8 + col * 2 + dx) as i64,
                                (y + row * 2 + dy) as i64,
                                rgb,
                            );
                        }
                    }
                }
            }
        }
    }
}

fn fmt_tick(v: f64) -> String {
    if v == v.trunc() && v.abs() < 1e6 {
        format!("{}", v as i64)
    } else if v.abs() >= 1e4 || v.abs() < 1e-2 {
        format!("{v:.1e}")
    } else {
        format!("{v:.3}")
    }
}

/// Reads `metrics.jsonl` into metric → (step, value) series.
pub fn read_metrics(path: &Path) -> Result<BTreeMap<String, Vec<(f64, f64)>>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| Error::file(path, format!("line {}: {e}", i + 1)))?;
        let obj = v
            .as_object()
            .ok_or_else(|| Error::file(path, format!("line {}: expected an object", i + 1)))?;
        // Offline trainers count steps, PPO and GRPO iterations.
        let step = ["step", "iteration"]
            .iter()
            .find_map(|k| obj.get(*k)?.as_f64())
            .unwrap_or((i + 1) as f64);
        for (k, val) in obj {
            let axis = matches!(k.as_str(), "step" | "iteration" | "epoch");
            if let (Some(x), false) = (val.as_f64(), axis) {
                if x.is_finite() {
                    series.entry(k.clone()).or_default().push((step, x));
                }
            }
        }
    }
    Ok(series)
}

/// Draws every series into one PNG at `out`.
pub fn plot_series(
    series: &BTreeMap<String, Vec<(f64, f64)>>,
    title: &str,
    out: &Path,
) -> Result<()> {
    if series.is_empty() {
        return Err(Error::file(out, "nothing to plot: no numeric metrics"));
    }
    let rows = series.len().div_ceil(COLS);
    let mut c = Canvas::new(COLS * PANEL_W, rows * PANEL_H + 24);
    c.text(8, 6, title, [0, 0, 0]);
    for (k, (name, pts)) in series.iter().enumerate() {
        let (ox, oy) = ((k % COLS) * PANEL_W, 24 + (k / COLS) * PANEL_H);
        let (x0, x1) = (ox + MARGIN_L, ox + PANEL_W - MARGIN_R);
        let (y0, y1) = (oy + MARGIN_T, oy + PANEL_H - MARGIN_B);
        c.text(x0, oy + 8, name, [0, 0, 120]);
        let (xmin, xmax) = pts
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
                (a.min(p.0), b.max(p.0))
            });
        let (mut ymin, mut ymax) = pts
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
                (a.min(p.1), b.max(p.1))
            });
        if ymax - ymin < 1e-12 {
            ymin -= 0.5;
            ymax += 0.5;
        }
        let sx = |x: f64| x0 as f64 + (x - xmin) / (xmax - xmin).max(1e-12) * (x1 - x0) as f64;
        let sy = |y: f64| y1 as f64 - (y - ymin) / (ymax - ymin) * (y1 - y0) as f64;
        let axis = [120, 120, 120];
        c.line((x0 as f64, y0 as f64), (x0 as f64, y1 as f64), axis);
        c.line((x0 as f64, y1 as f64), (x1 as f64, y1 as f64), axis);
        c.text(ox + 4, y0, &fmt_tick(ymax), axis);
        c.text(ox + 4, y1 - 10, &fmt_tick(ymin), axis);
        c.text(x0, y1 + 6, &fmt_tick(xmin), axis);
        let xl = fmt_tick(xmax);
        c.text(x1.saturating_sub(xl.len() * 8), y1 + 6, &xl, axis);
        for w in pts.windows(2) {
            c.line(
                (sx(w[0].0), sy(w[0].1)),
                (sx(w[1].0), sy(w[1].1)),
                [200, 40, 40],
            );
        }
        if pts.len() == 1 {
            c.set(sx(pts[0].0) as i64, sy(pts[0].1) as i64, [200, 40, 40]);
        }
    }
    write_atomic(out, |tmp| {
        let file = std::fs::File::create(tmp).map_err(|e| Error::io(tmp, e))?;
        let mut enc = png::Encoder::new(std::io::BufWriter::new(file), c.w as u32, c.h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc
            .write_header()
            .map_err(|e| Error::file(tmp, e.to_string()))?;
        w.write_image_data(&c.px)
            .map_err(|e| Error::file(tmp, e.to_string()))
    })
}

/// `rlhf plot RUN_DIR`: writes `RUN_DIR/metrics.png`; returns its path.
pub fn plot_run(run_dir: &Path) -> Result<std::path::PathBuf> {
    let series = read_metrics(&run_dir.join("metrics.jsonl"))?;
    let out = run_dir.join("metrics.png");
    let title = run_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    plot_series(&series, &title, &out)?;
    Ok(out)
}
