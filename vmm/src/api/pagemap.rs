//! Pagemap answers, held compactly and streamed in the format the client asked for.
//!
//! A 2^20-page answer as JSON is ~150 MiB; held as 9 bytes a page it is 9 MiB, and each
//! page's JSON object exists only while it is written (docs/security.md).

use super::protocol::{Answer, Page, PagemapFormat, PagemapHeader, PagemapPages, PagemapSummary};
use crate::tracking::softdirty::PageInfo;
use serde::ser::{Serialize, Serializer};
use std::io::Write;

/// A pagemap answer as the vCPU thread hands it to the connection: 9 bytes a page (the
/// entry and two flags), whatever the format the client asked for.
pub struct PagemapAnswer {
    pid: u32,
    /// (first address, pages) of each requested range, in order.
    ranges: Vec<(u64, u64)>,
    entries: Vec<u64>,
    /// Bit 0 huge, bit 1 accessed.
    flags: Vec<u8>,
    elapsed_ns: u64,
}

impl PagemapAnswer {
    /// Compacts the walk's `pages` of process `pid` (taken in `elapsed_ns`).
    pub fn new(pid: u32, pages: &[PageInfo], elapsed_ns: u64) -> PagemapAnswer {
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for p in pages {
            match ranges.last_mut() {
                Some((start, n)) if *start + *n * 4096 == p.addr => *n += 1,
                _ => ranges.push((p.addr, 1)),
            }
        }
        PagemapAnswer {
            pid,
            ranges,
            entries: pages.iter().map(|p| p.entry.0).collect(),
            flags: pages.iter().map(|p| u8::from(p.huge) | (u8::from(p.accessed) << 1)).collect(),
            elapsed_ns,
        }
    }

    fn pages(&self) -> impl Iterator<Item = Page> + '_ {
        let addrs = self.ranges.iter().flat_map(|&(start, n)| (0..n).map(move |i| start + i * 4096));
        addrs.zip(self.entries.iter().zip(&self.flags)).map(|(addr, (&entry, &flags))| Page::new(addr, entry, flags & 1 != 0, flags & 2 != 0))
    }

    /// The counts only (`"summary":true`).
    pub fn summary(&self) -> PagemapSummary {
        let entries = || self.entries.iter().map(|&e| mmu::PagemapEntry(e));
        PagemapSummary {
            pid: self.pid,
            count: self.entries.len() as u64,
            present: entries().filter(|e| e.is_present()).count() as u64,
            soft_dirty: entries().filter(|e| e.soft_dirty()).count() as u64,
            elapsed_ns: self.elapsed_ns,
        }
    }

    fn header(&self, format: PagemapFormat) -> Answer<PagemapHeader> {
        let count = self.entries.len() as u64;
        let bytes = (format == PagemapFormat::Raw).then_some(count * 8);
        Answer::new(PagemapHeader { pid: self.pid, elapsed_ns: self.elapsed_ns, format, count, bytes })
    }

    /// Streams the answer to `w` in `format`.
    pub fn write(&self, w: &mut impl Write, format: PagemapFormat) -> std::io::Result<()> {
        match format {
            PagemapFormat::Array => {
                let answer = Answer::new(PagemapPages { pid: self.pid, elapsed_ns: self.elapsed_ns, pages: Streamed(self) });
                serde_json::to_writer(&mut *w, &answer)?;
                w.write_all(b"\n")?;
            }
            PagemapFormat::Lines => {
                serde_json::to_writer(&mut *w, &self.header(format))?;
                w.write_all(b"\n")?;
                for page in self.pages() {
                    serde_json::to_writer(&mut *w, &page)?;
                    w.write_all(b"\n")?;
                }
            }
            PagemapFormat::Raw => {
                serde_json::to_writer(&mut *w, &self.header(format))?;
                w.write_all(b"\n")?;
                for chunk in self.entries.chunks(4096) {
                    let raw: Vec<u8> = chunk.iter().flat_map(|e| e.to_le_bytes()).collect();
                    w.write_all(&raw)?;
                }
            }
        }
        w.flush()
    }
}

/// The pages of an answer as a JSON array, each built as it is written.
struct Streamed<'a>(&'a PagemapAnswer);

impl Serialize for Streamed<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.pages())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mmu::PagemapEntry;
    use serde_json::{json, Value};

    fn answer() -> (PagemapAnswer, [PageInfo; 3]) {
        let page = |addr, entry: PagemapEntry, huge| PageInfo { addr, entry, huge, accessed: !huge };
        let pages = [
            page(0x400000, PagemapEntry::present(0x1234).with_soft_dirty(true).with_exclusive(true), false),
            page(0x401000, PagemapEntry::none(), false),
            page(0x600000, PagemapEntry::present(7), true),
        ];
        (PagemapAnswer::new(3, &pages, 99), pages)
    }

    #[test]
    fn pagemap_answers_stream_in_every_format() {
        let (answer, pages) = answer();
        assert_eq!(answer.ranges, vec![(0x400000, 2), (0x600000, 1)]);
        let mut array = Vec::new();
        answer.write(&mut array, PagemapFormat::Array).unwrap();
        let v: Value = serde_json::from_slice(&array).unwrap();
        assert_eq!((v["ok"].clone(), v["pid"].clone(), v["elapsed_ns"].clone()), (json!(true), json!(3), json!(99)));
        let got = v["pages"].as_array().unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], json!({"addr": 0x400000, "entry": pages[0].entry.0, "present": true, "pfn": 0x1234,
            "soft_dirty": true, "exclusive": true, "huge": false, "accessed": true}));
        assert_eq!(got[1]["pfn"], Value::Null);
        assert_eq!((got[2]["addr"].clone(), got[2]["huge"].clone()), (json!(0x600000), json!(true)));
        let mut lines = Vec::new();
        answer.write(&mut lines, PagemapFormat::Lines).unwrap();
        let lines: Vec<Value> = lines.split(|&b| b == b'\n').filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap()).collect();
        assert_eq!(lines[0]["count"], json!(3));
        assert_eq!(&lines[1..], got.as_slice());
        let mut raw = Vec::new();
        answer.write(&mut raw, PagemapFormat::Raw).unwrap();
        let split = raw.iter().position(|&b| b == b'\n').unwrap() + 1;
        let header: Value = serde_json::from_slice(&raw[..split]).unwrap();
        assert_eq!(header["bytes"], json!(24));
        let body: Vec<u64> = raw[split..].chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(body, pages.iter().map(|p| p.entry.0).collect::<Vec<_>>());
    }

    /// The bytes are those of the hand-written format that preceded the typed one.
    #[test]
    fn pagemap_lines_keep_their_bytes() {
        let (answer, pages) = answer();
        let mut out = Vec::new();
        answer.write(&mut out, PagemapFormat::Lines).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], r#"{"ok":true,"pid":3,"elapsed_ns":99,"format":"lines","count":3}"#);
        assert_eq!(lines[1], format!(r#"{{"addr":4194304,"entry":{},"present":true,"pfn":4660,"soft_dirty":true,"exclusive":true,"huge":false,"accessed":true}}"#, pages[0].entry.0));
        assert_eq!(lines[2], format!(r#"{{"addr":4198400,"entry":{},"present":false,"pfn":null,"soft_dirty":false,"exclusive":false,"huge":false,"accessed":true}}"#, pages[1].entry.0));
        let mut array = Vec::new();
        answer.write(&mut array, PagemapFormat::Array).unwrap();
        let array = String::from_utf8(array).unwrap();
        assert!(array.starts_with(&format!(r#"{{"ok":true,"pid":3,"elapsed_ns":99,"pages":[{},{},"#, lines[1], lines[2])), "{array}");
        assert!(array.ends_with("}]}\n"), "{array}");
    }

    #[test]
    fn summaries_count_present_and_soft_dirty_pages() {
        let (answer, _) = answer();
        assert_eq!(answer.summary(), PagemapSummary { pid: 3, count: 3, present: 2, soft_dirty: 1, elapsed_ns: 99 });
    }
}
