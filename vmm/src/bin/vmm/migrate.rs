//! `vmm migrate`: asks a running VMM to migrate its VM and reports each round.

use crate::store::absolute;
use crate::{client_code, fail};
use std::path::{Path, PathBuf};
use std::time::Duration;
use vmm::api::{self, MigrationDone, Request, RoundLine};
use vmm::migration::transport::Flags;
use vmm::ExitCode;

/// How the migration switches over.
pub struct Switch {
    pub postcopy: bool,
    pub postcopy_fallback: bool,
    pub throttle: bool,
}

#[allow(clippy::too_many_arguments)]
pub fn run(api_sock: &Path, to: String, tls: Flags, downtime_ms: u64, bandwidth: Option<u64>, timeout: Duration, switch: Switch,
    json: bool) -> ExitCode {
    // The VMM reads the files: it needs paths that do not depend on this shell's directory.
    let path = |p: Option<PathBuf>| p.map(|p| absolute(p).display().to_string());
    let req = Request::Migrate {
        to,
        downtime_ms: Some(downtime_ms),
        bandwidth,
        timeout_ms: Some(timeout.as_millis() as u64),
        postcopy: switch.postcopy.then_some(true),
        postcopy_fallback: switch.postcopy_fallback.then_some(true),
        throttle: (!switch.throttle).then_some(false),
        tls_cert: path(tls.tls_cert),
        tls_key: path(tls.tls_key),
        tls_ca: path(tls.tls_ca),
        insecure_plaintext: tls.insecure_plaintext.then_some(true),
    };
    let result = api::call_with_updates::<MigrationDone>(api_sock, &req, |line| print_round(&line, json));
    match result {
        Ok(s) => {
            if json {
                println!("{}", serde_json::to_value(&s).expect("a summary serializes"));
            } else {
                let throttled = if s.throttled {
                    format!("yes (up to {:.0}%, the vCPU held out for {:.0} ms)", s.max_throttle_pct, s.throttled_ms)
                } else {
                    "no".into()
                };
                let postcopy = if s.postcopy {
                    format!("yes ({} demand faults, faulting threads blocked {:.1} ms, {} pages after the switch-over)", s.demand_faults,
                        s.postcopy_blocked_ms, s.postcopy_pages)
                } else {
                    "no".into()
                };
                println!("migrated to {} in {:.1} ms: downtime {:.1} ms, {} rounds, {} bytes sent, {} pages sent, {} pages sent as zero, post-copy {postcopy}, throttled {throttled}",
                    s.to, s.total_ms, s.downtime_ms, s.rounds, s.bytes_sent, s.pages_sent, s.zero_pages);
            }
            ExitCode::Success
        }
        Err(e) => fail(client_code(&e), e),
    }
}

/// Prints a pre-copy round's progress line (a migration's or a live snapshot's), as JSON
/// or as text; other lines are ignored.
pub fn print_round(line: &serde_json::Value, json: bool) {
    let Ok(RoundLine { round: r }) = serde_json::from_value::<RoundLine>(line.clone()) else { return };
    if json {
        println!("{line}");
    } else {
        let throttle = if r.throttle_pct > 0.0 { format!(", throttle {:.0}%", r.throttle_pct) } else { String::new() };
        println!("round {}: {} pages sent, {} dirtied since, {:.1} MiB/s, expected downtime {:.1} ms{throttle}",
            r.round, r.pages_sent, r.pages_dirtied, r.bandwidth_mib_s, r.expected_downtime_ms);
    }
}
