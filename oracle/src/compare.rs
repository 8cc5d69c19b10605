//! `sd-compare LINUX.out OURS.out [--superset]`: lists every disagreement between the
//! Linux executor's output and ours (see `linux_oracle::compare`). Exit status 1 when
//! anything disagrees.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let superset = args.iter().any(|a| a == "--superset");
    let files: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    if files.len() != 2 {
        eprintln!("usage: sd-compare LINUX.out OURS.out [--superset]");
        std::process::exit(64);
    }
    let read = |p: &str| {
        std::fs::read_to_string(p).unwrap_or_else(|e| {
            eprintln!("sd-compare: cannot read {p}: {e}");
            std::process::exit(64)
        })
    };
    let r = linux_oracle::compare(&read(files[0]), &read(files[1]), superset);
    print!("{}", r.table);
    for l in &r.disagreements {
        println!("{l}");
    }
    println!("{} disagreement(s)", r.disagreements.len());
    std::process::exit(i32::from(!r.disagreements.is_empty()));
}
