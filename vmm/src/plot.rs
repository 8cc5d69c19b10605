//! What every picture the project draws needs: a TrueType font for plotters' text, for
//! the CLI's pictures (`vmm heatmap`) and the benchmarks' charts alike.

use std::sync::OnceLock;

/// Where Debian, Fedora and Arch put a sans-serif font (`fonts-dejavu-core` et al.).
const CANDIDATES: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

/// Registers the font as plotters' "sans-serif" once: `VMM_FONT` (a .ttf path) if set,
/// else the first of the usual system paths that exists.
pub fn sans_serif() -> Result<(), String> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let paths: Vec<String> = match std::env::var("VMM_FONT") {
            Ok(p) => vec![p],
            Err(_) => CANDIDATES.iter().map(|s| s.to_string()).collect(),
        };
        let Some((path, bytes)) = paths.iter().find_map(|p| std::fs::read(p).ok().map(|b| (p, b))) else {
            return Err(format!("no TrueType font for the picture's text (tried {}): install fonts-dejavu-core or set VMM_FONT=FILE.ttf",
                paths.join(", ")));
        };
        // Plotters keeps fonts for the whole process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        for style in [plotters::style::FontStyle::Normal, plotters::style::FontStyle::Bold] {
            plotters::style::register_font("sans-serif", style, bytes).map_err(|_| format!("{path} is not a TrueType font"))?;
        }
        Ok(())
    })
    .clone()
}
