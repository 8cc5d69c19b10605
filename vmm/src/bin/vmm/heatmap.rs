//! `vmm heatmap`: samples where each guest process writes and draws it: one panel per
//! process, time along x, its mappings' rows along y (start addresses labelled), each
//! cell coloured by the share of the row's pages written in that interval.

use crate::{client_code, fail};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use vmm::api::{self, Heatmap, HeatmapProcess, Request};
use vmm::ExitCode;

pub struct Args {
    pub pid: Option<u32>,
    pub seconds: f64,
    pub interval: u64,
    pub out: PathBuf,
    pub json: bool,
}

#[derive(Clone, Copy, PartialEq)]
enum Format {
    Svg,
    Png,
}

const WIDTH: u32 = 1200;
const TITLE: u32 = 56;
const PANEL_HEAD: u32 = 28;
const X_AXIS: u32 = 34;
const LEGEND: u32 = 64;
const LABELS: u32 = 190;

/// Pixel height of a panel's cells: 6 px a row, within 60..=360.
fn cells_height(rows: usize) -> u32 {
    (rows as u32 * 6).clamp(60, 360)
}

fn panel_height(p: &HeatmapProcess) -> u32 {
    PANEL_HEAD + cells_height(p.rows.len()) + X_AXIS + 12
}

/// The picture's size for `hm`: it grows with the rows of every panel.
pub fn size(hm: &Heatmap) -> (u32, u32) {
    (WIDTH, TITLE + hm.processes.iter().map(panel_height).sum::<u32>().max(80) + LEGEND)
}

/// White for none, then light yellow to dark red as the share goes to 1.
fn heat(share: f64) -> RGBColor {
    if share <= 0.0 {
        return RGBColor(244, 244, 244);
    }
    let stops = [(255.0, 237.0, 160.0), (253.0, 141.0, 60.0), (189.0, 0.0, 38.0)];
    let t = share.clamp(0.0, 1.0) * 2.0;
    let (a, b, f) = if t < 1.0 { (stops[0], stops[1], t) } else { (stops[1], stops[2], t - 1.0) };
    let mix = |x: f64, y: f64| (x + (y - x) * f).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

fn draw<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, hm: &Heatmap) -> DrawResult
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let total: u64 = hm.processes.iter().map(|p| p.written).sum();
    let title = format!(
        "vmm heatmap: engine {}, guest {} MiB, {} intervals of {} ms ({:.1} s{}); {} pages written",
        hm.engine, hm.mem_bytes >> 20, hm.intervals, hm.interval_ms, hm.seconds, if hm.complete { "" } else { ", the VM finished" }, total
    );
    root.draw(&Text::new(title, (16, 12), ("sans-serif", 20).into_font()))?;
    root.draw(&Text::new(
        "writes: frames in the dirty log (per interval) joined with each process's page tables, as dirty-rate counts them",
        (16, 36),
        ("sans-serif", 13).into_font().color(&RGBColor(90, 90, 90)),
    ))?;
    let span = (hm.intervals.max(1) * hm.interval_ms) as f64 / 1000.0;
    let step = hm.interval_ms as f64 / 1000.0;
    let mut y = TITLE as i32;
    if hm.processes.is_empty() {
        root.draw(&Text::new("no live process was seen", (16, y + 20), ("sans-serif", 16).into_font()))?;
    }
    for p in &hm.processes {
        let h = panel_height(p);
        let area = root.clone().shrink((0, y as u32), (WIDTH, h));
        let caption = format!("pid {} ({}): {} pages written, {} rows", p.pid, p.name, p.written, p.rows.len());
        let rows = p.rows.len().max(1) as f64;
        let mut chart = ChartBuilder::on(&area)
            .caption(caption, ("sans-serif", 15))
            .margin_right(20)
            .x_label_area_size(X_AXIS)
            .y_label_area_size(LABELS)
            .build_cartesian_2d(0f64..span, 0f64..rows)?;
        chart.configure_mesh().disable_mesh().y_labels(0).x_desc("seconds").draw()?;
        // Row 0 (the lowest address met first) at the top.
        let top = |r: usize| rows - r as f64;
        chart.draw_series(p.rows.iter().enumerate().flat_map(|(r, row)| {
            let pages = (row.end - row.start) / 4096;
            let max = if row.other { row.counts.iter().copied().max().unwrap_or(1).max(1) as u64 } else { pages.max(1) };
            row.counts.iter().enumerate().map(move |(c, &n)| {
                let x0 = c as f64 * step;
                Rectangle::new([(x0, top(r) - 1.0), (x0 + step, top(r))], heat(n as f64 / max as f64).filled())
            })
        }))?;
        // Each mapping's start beside its first row, and the start of every few rows
        // between (lighter), so that a hot band can be read off as an address.
        let (label_font, tick_font) = (("sans-serif", 12).into_font(), ("sans-serif", 10).into_font().color(&RGBColor(120, 120, 120)));
        let every = (p.rows.len() / 8).max(1);
        let base = area.get_base_pixel();
        let mut last_label = i32::MIN;
        for (r, row) in p.rows.iter().enumerate() {
            let first = r == 0 || row.other || p.rows[r - 1].mapping_start != row.mapping_start;
            let (px, py) = chart.backend_coord(&(0.0, top(r) - 0.5));
            let (x, y) = (px - LABELS as i32 + 8 - base.0, py - 6 - base.1);
            if first {
                let text = if row.other { "other mappings".to_string() } else { format!("{:#x}", row.mapping_start) };
                area.draw(&Text::new(text, (x, y), label_font.clone()))?;
                last_label = y;
            } else if r % every == 0 && y - last_label >= 14 {
                area.draw(&Text::new(format!("{:#x}", row.start), (x + 14, y), tick_font.clone()))?;
                last_label = y;
            }
        }
        y += h as i32;
    }
    // The legend: the share of a row's pages written in one interval.
    let ly = y + 16;
    root.draw(&Text::new("share of the row's pages written in the interval:", (16, ly), ("sans-serif", 13).into_font()))?;
    for i in 0..=10 {
        let x = 330 + i * 40;
        root.draw(&Rectangle::new([(x, ly - 2), (x + 36, ly + 16)], heat(i as f64 / 10.0).filled()))?;
        root.draw(&Text::new(format!("{}%", i * 10), (x + 4, ly + 22), ("sans-serif", 11).into_font()))?;
    }
    root.present()?;
    Ok(())
}

fn render(hm: &Heatmap, out: &Path, format: Format) -> DrawResult {
    let dims = size(hm);
    match format {
        Format::Svg => draw(&SVGBackend::new(out, dims).into_drawing_area(), hm),
        Format::Png => draw(&BitMapBackend::new(out, dims).into_drawing_area(), hm),
    }
}

pub fn run(api_sock: &Path, a: Args) -> ExitCode {
    let format = match a.out.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("svg") => Format::Svg,
        Some("png") => Format::Png,
        _ => return fail(ExitCode::BadInput, format!("--out {}: the picture is .svg or .png", a.out.display())),
    };
    // Before sampling: a missing font is known now, not after the seconds.
    if let Err(e) = vmm::plot::sans_serif() {
        return fail(ExitCode::Unavailable, e);
    }
    let req = Request::Heatmap { pid: a.pid, seconds: Some(a.seconds), interval_ms: Some(a.interval) };
    let hm: Heatmap = match api::call(api_sock, &req) {
        Ok(hm) => hm,
        Err(e) => return fail(client_code(&e), e),
    };
    // Into a temporary file first: a failed drawing leaves no half picture under the name.
    let tmp = a.out.with_extension(format!("partial.{}", if format == Format::Svg { "svg" } else { "png" }));
    if let Err(e) = render(&hm, &tmp, format).and_then(|()| std::fs::rename(&tmp, &a.out).map_err(Into::into)) {
        let _ = std::fs::remove_file(&tmp);
        return fail(ExitCode::IoError, format!("writing {} failed: {e}", a.out.display()));
    }
    let (w, h) = size(&hm);
    let rows: usize = hm.processes.iter().map(|p| p.rows.len()).sum();
    eprintln!("vmm: wrote {}: {} panels, {rows} rows x {} intervals, {w}x{h} px", a.out.display(), hm.processes.len(), hm.intervals);
    if a.json {
        println!("{}", serde_json::to_string(&hm).unwrap_or_default());
    }
    ExitCode::Success
}
