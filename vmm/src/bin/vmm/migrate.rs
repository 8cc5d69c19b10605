//! `vmm migrate`: asks a running VMM to migrate its VM and reports each round.

use crate::{client_code, fail};
use std::path::Path;
use std::time::Duration;
use vmm::api::{self, MigrationDone, Request, RoundLine};
use vmm::ExitCode;

pub fn run(api_sock: &Path, to: String, downtime_ms: u64, bandwidth: Option<u64>, timeout: Duration, postcopy: bool,
    json: bool) -> ExitCode {
    let req = Request::Migrate {
        to,
        downtime_ms: Some(downtime_ms),
        bandwidth,
        timeout_ms: Some(timeout.as_millis() as u64),
        postcopy: postcopy.then_some(true),
    };
    let result = api::call_with_updates::<MigrationDone>(api_sock, &req, |line| {
        let Ok(RoundLine { round: r }) = serde_json::from_value::<RoundLine>(line.clone()) else { return };
        if json {
            println!("{line}");
        } else {
            println!("round {}: {} pages sent, {} dirtied since, {:.1} MiB/s, expected downtime {:.1} ms",
                r.round, r.pages_sent, r.pages_dirtied, r.bandwidth_mib_s, r.expected_downtime_ms);
        }
    });
    match result {
        Ok(s) => {
            if json {
                println!("{}", serde_json::to_value(&s).expect("a summary serializes"));
            } else {
                println!("migrated to {} in {:.1} ms: downtime {:.1} ms, {} rounds, {} bytes sent, {} pages sent, {} pages sent as zero, post-copy {}, throttled {}",
                    s.to, s.total_ms, s.downtime_ms, s.rounds, s.bytes_sent, s.pages_sent, s.zero_pages,
                    if s.postcopy { "yes" } else { "no" }, if s.throttled { "yes" } else { "no" });
            }
            ExitCode::Success
        }
        Err(e) => fail(client_code(&e), e),
    }
}
