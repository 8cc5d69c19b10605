//! `vmm heatmap` through the real binary, under every engine: a process rewriting a small
//! hot range shows in its rows interval after interval while one that wrote once and
//! idles shows in none; the picture is a valid SVG or PNG of the matrix's size; bad
//! arguments and pids are refused by name.

mod common;
use common::*;
use serde_json::Value;

const HOT: u64 = 0x1000_0000;
const COLD: u64 = 0x2000_0000;
const HOT_PAGES: u64 = 4;

/// hot rewrites 4 of its 64 pages forever; cold writes its 256 pages once, then idles;
/// gone exits at once. Sampling starts after cold's `sync`, when its write is done.
const SCRIPT: &str = "\
proc hot
map 0x10000000 64
loop 1000000000
  fill 0x10000000 4 1
  yield
end
proc cold
map 0x20000000 256
fill 0x20000000 256 2
sync cold-done
loop 1000000000
  yield
end
proc gone
exit 0
";

fn start(engine: &str) -> Option<Live> {
    let live = Live::try_start(SCRIPT, &["--engine", engine, "--mem", "64", "--timeout", "600"]).map_err(|r| {
        assert!(r.code == 69 && r.stderr.contains("is unavailable on this host"), "the VMM failed to start: {r:?}");
        eprintln!("SKIPPED ({engine}): {}", r.stderr.trim());
    }).ok()?;
    live.wait("cold-done");
    live.resume();
    Some(live)
}

/// The picture's size as the CLI reports it on stderr ("..., WxH px").
fn reported_size(stderr: &str) -> (u32, u32) {
    let dims = stderr.rsplit(", ").next().and_then(|s| s.trim().strip_suffix(" px")).unwrap_or_else(|| panic!("{stderr}"));
    let (w, h) = dims.split_once('x').unwrap();
    (w.parse().unwrap(), h.parse().unwrap())
}

fn hot_and_cold_are_told_apart(engine: &str) {
    let Some(live) = start(engine) else { return };
    let dir = tempdir();
    let svg = dir.path().join("heat.svg");
    let r = live.client("heatmap", &["--seconds", "1.5", "--interval", "100", "--out", svg.to_str().unwrap(), "--json"]);
    assert_eq!(r.code, 0, "{r:?}");
    let hm: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!((hm["engine"].as_str(), hm["intervals"].as_u64(), hm["complete"].as_bool()), (Some(engine), Some(15), Some(true)), "{hm}");
    let procs = hm["processes"].as_array().unwrap();
    let by_name = |n: &str| procs.iter().find(|p| p["name"] == n).unwrap_or_else(|| panic!("no {n} in {hm}"));
    assert!(procs.iter().all(|p| p["name"] != "gone"), "an exited process has no panel");
    let (hot, cold) = (by_name("hot"), by_name("cold"));
    let rows = |p: &Value| p["rows"].as_array().unwrap().clone();
    let counts = |row: &Value| row["counts"].as_array().unwrap().iter().map(|c| c.as_u64().unwrap()).collect::<Vec<_>>();
    // hot's 64 pages get a row each; the 4 it rewrites are written in most intervals
    // (the guest runs all along; at least half leaves room for a busy host).
    assert_eq!(rows(hot).len(), 64, "{hot}");
    for row in rows(hot) {
        let (start, c) = (row["start"].as_u64().unwrap(), counts(&row));
        assert_eq!(c.len(), 15);
        let written = c.iter().filter(|&&n| n > 0).count();
        if start < HOT + HOT_PAGES * 4096 {
            assert!(written >= 8, "{engine}: hot row {start:#x} written in {written} of 15 intervals: {c:?}");
            assert!(c.iter().all(|&n| n <= 1), "a one-page row counts at most its page: {c:?}");
        } else {
            assert_eq!(written, 0, "{engine}: hot's untouched row {start:#x}: {c:?}");
        }
    }
    // cold wrote before the sampling began: none of its rows in any interval.
    let cold_rows = rows(cold);
    assert_eq!(cold_rows.first().unwrap()["mapping_start"].as_u64(), Some(COLD));
    assert_eq!(cold_rows.iter().map(|r| (r["end"].as_u64().unwrap() - r["start"].as_u64().unwrap()) / 4096).sum::<u64>(), 256);
    assert!(cold_rows.len() <= 64, "256 pages binned into at most 64 rows: {}", cold_rows.len());
    for row in &cold_rows {
        assert!(counts(row).iter().all(|&n| n == 0), "{engine}: cold row {row}");
    }
    assert_eq!(cold["written"], 0);
    // The picture: well-formed SVG, of the size reported, one cell per row and interval.
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg") && text.trim_end().ends_with("</svg>"), "not an SVG document");
    let (w, h) = reported_size(&r.stderr);
    assert!(text.contains(&format!("width=\"{w}\"")) && text.contains(&format!("height=\"{h}\"")), "{}", &text[..200]);
    let cells = (rows(hot).len() + cold_rows.len()) * 15;
    assert!(text.matches("<rect").count() >= cells, "{} rects for {cells} cells", text.matches("<rect").count());
    assert!(text.contains("pid 1 (hot)") && text.contains("0x10000000") && text.contains(&format!("engine {engine}")), "labels and title");
}

macro_rules! per_engine {
    ($($m:ident => $e:expr),*) => {$(
        mod $m {
            #[test]
            fn hot_and_cold_are_told_apart() { super::hot_and_cold_are_told_apart($e) }
        }
    )*};
}
per_engine!(pte => "pte", hybrid => "hybrid", kvm_bitmap => "kvm-bitmap", kvm_ring => "kvm-ring", uffd => "uffd");

#[test]
fn a_png_of_one_process_and_bad_requests() {
    let live = start("kvm-bitmap").expect("kvm-bitmap runs here");
    let dir = tempdir();
    let png = dir.path().join("hot.png");
    let r = live.client("heatmap", &["--pid", "1", "--seconds", "0.5", "--interval", "50", "--out", png.to_str().unwrap(), "--json"]);
    assert_eq!(r.code, 0, "{r:?}");
    let hm: Value = serde_json::from_str(&r.stdout).unwrap();
    let procs = hm["processes"].as_array().unwrap();
    assert_eq!((procs.len(), procs[0]["pid"].as_u64(), hm["intervals"].as_u64()), (1, Some(1), Some(10)), "{hm}");
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "a PNG file");
    let be = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().unwrap());
    assert_eq!((be(16), be(20)), reported_size(&r.stderr), "the IHDR size is the size reported");
    let out = dir.path().join("x.svg");
    let out = out.to_str().unwrap();
    for (args, code, says) in [
        (vec!["--pid", "9", "--out", out], 65, "no process with pid 9"),
        (vec!["--pid", "3", "--out", out], 65, "pid 3 has exited"),
        (vec!["--seconds", "0", "--out", out], 65, "seconds 0: must be more than 0 and at most 600"),
        (vec!["--seconds", "601", "--out", out], 65, "at most 600"),
        (vec!["--interval", "5", "--out", out], 65, "interval_ms 5: must be 10 to 60000"),
        (vec!["--seconds", "600", "--interval", "10", "--out", out], 65, "more than 1000: use a longer interval"),
        (vec!["--out", dir.path().join("x.bmp").to_str().unwrap()], 64, "the picture is .svg or .png"),
    ] {
        let r = live.client("heatmap", &args);
        assert_eq!(r.code, code, "{args:?}: {r:?}");
        assert!(r.stderr.contains(says), "{args:?}: {r:?}");
    }
    assert!(!std::path::Path::new(out).exists(), "no picture from a refused request");
}
