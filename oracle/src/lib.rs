//! Comparing the Linux executor's output with ours (the `sd-compare` tool and the oracle
//! test): lists every disagreement between the two — scenario, label, pid, page, field, ours vs Linux
//! — and a per-scenario agreement table. Exact by default (the pte engine);
//! `--superset` for guest-physical engines: every page Linux reports soft-dirty must be
//! soft-dirty in ours, presence must agree, exclusivity is not compared. A scenario or
//! a read missing from one side, or a different final status, is a disagreement too.

use std::collections::BTreeMap;

pub type Reads = BTreeMap<(String, u32, u64), [bool; 3]>;

#[derive(Default)]
pub struct Scenario {
    pub reads: Reads,
    pub other: Vec<String>,
}

pub fn parse(text: &str) -> BTreeMap<String, Scenario> {
    let mut out: BTreeMap<String, Scenario> = BTreeMap::new();
    let mut cur: Option<String> = None;
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("== ") {
            let name = name.rsplit('/').next().unwrap_or(name).to_string();
            out.entry(name.clone()).or_default();
            cur = Some(name);
            continue;
        }
        let Some(name) = &cur else { continue };
        let sc = out.get_mut(name).expect("entry made above");
        let f: Vec<&str> = line.split_whitespace().collect();
        let bit = |s: &str, k: &str| s.strip_prefix(k).map(|v| v == "1");
        if let [label, "pid", pid, addr, p, sd, ex] = f.as_slice() {
            if let (Ok(pid), Ok(addr), Some(p), Some(sd), Some(ex)) = (
                pid.parse::<u32>(),
                u64::from_str_radix(addr.trim_start_matches("0x"), 16),
                bit(p, "present="),
                bit(sd, "soft-dirty="),
                bit(ex, "exclusive="),
            ) {
                sc.reads.insert((label.to_string(), pid, addr), [p, sd, ex]);
                continue;
            }
        }
        if line.starts_with("status ") || line.starts_with("error:") || line.contains(" refused ") {
            sc.other.push(line.to_string());
        }
    }
    out
}

/// The comparison: a markdown table per scenario, the disagreement lines, and their
/// count.
pub struct Report {
    pub table: String,
    pub disagreements: Vec<String>,
}

pub fn compare(linux_text: &str, ours_text: &str, superset: bool) -> Report {
    let (linux, ours) = (parse(linux_text), parse(ours_text));
    let names = ["present", "soft-dirty", "exclusive"];
    let mut table = String::from("| scenario | pages read | agree | disagree | status |\n|---|---:|---:|---:|---|\n");
    let mut lines = Vec::new();
    for name in linux.keys().chain(ours.keys()).collect::<std::collections::BTreeSet<_>>() {
        let (Some(l), Some(o)) = (linux.get(name), ours.get(name)) else {
            lines.push(format!("DISAGREE {name}: scenario missing from {}", if linux.contains_key(name) { "ours" } else { "Linux" }));
            continue;
        };
        let before = lines.len();
        for (key, lv) in &l.reads {
            let (label, pid, addr) = key;
            let Some(ov) = o.reads.get(key) else {
                lines.push(format!("DISAGREE {name} {label} pid {pid} {addr:#x}: read missing from ours"));
                continue;
            };
            for f in 0..3 {
                let differs = match (superset, f) {
                    (true, 1) => lv[1] && !ov[1],
                    (true, 2) => false,
                    _ => lv[f] != ov[f],
                };
                if differs {
                    lines.push(format!("DISAGREE {name} {label} pid {pid} {addr:#x} {}: ours={} linux={}", names[f],
                        u8::from(ov[f]), u8::from(lv[f])));
                }
            }
        }
        for key in o.reads.keys().filter(|k| !l.reads.contains_key(*k)) {
            lines.push(format!("DISAGREE {name} {} pid {} {:#x}: read missing from Linux", key.0, key.1, key.2));
        }
        if l.other != o.other {
            lines.push(format!("DISAGREE {name}: outcome ours={:?} linux={:?}", o.other, l.other));
        }
        // An error (an unreached plan label, a refused scenario) is never a pass, even
        // when both sides report it.
        for e in l.other.iter().chain(&o.other).filter(|l| l.starts_with("error:")) {
            lines.push(format!("DISAGREE {name}: {e}"));
        }
        let disagree = lines.len() - before;
        table += &format!("| {name} | {} | {} | {disagree} | {} |\n", l.reads.len(), l.reads.len().saturating_sub(disagree),
            l.other.join("; "));
    }
    Report { table, disagreements: lines }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINUX: &str = "== a.sd\ns#1 pid 1 0x400000 present=1 soft-dirty=1 exclusive=1\ns#1 pid 1 0x401000 present=0 soft-dirty=0 exclusive=0\nstatus ok\n";

    #[test]
    fn identical_outputs_agree() {
        let r = compare(LINUX, LINUX, false);
        assert!(r.disagreements.is_empty());
        assert!(r.table.contains("| a.sd | 2 | 2 | 0 | status ok |"));
    }

    #[test]
    fn every_kind_of_difference_is_reported() {
        let ours = "== a.sd\ns#1 pid 1 0x400000 present=1 soft-dirty=0 exclusive=0\nstatus failed\n== b.sd\nstatus ok\n";
        let r = compare(LINUX, ours, false);
        let all = r.disagreements.join("\n");
        assert!(all.contains("0x400000 soft-dirty: ours=0 linux=1"), "{all}");
        assert!(all.contains("0x400000 exclusive: ours=0 linux=1"), "{all}");
        assert!(all.contains("0x401000: read missing from ours"), "{all}");
        assert!(all.contains("outcome"), "{all}");
        assert!(all.contains("b.sd: scenario missing from Linux"), "{all}");
        // Superset: a page soft-dirty in Linux must be soft-dirty in ours; extra is fine.
        let extra = LINUX.replace("0x401000 present=0 soft-dirty=0", "0x401000 present=0 soft-dirty=1");
        assert!(compare(LINUX, &extra, true).disagreements.is_empty());
        assert!(!compare(&extra, LINUX, true).disagreements.is_empty());
        // Errors never pass, even when both sides agree on them.
        let unreached = LINUX.replace("status ok", "error: plan label 'x' was never reached\nstatus ok");
        assert_eq!(compare(&unreached, &unreached, false).disagreements.len(), 2);
    }
}
