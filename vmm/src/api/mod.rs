//! The control socket: one JSON object per line each way (docs/api.md).
//!
//! ```text
//! -> {"cmd":"status"}
//! <- {"label":"start","ok":true,"phase":"paused","pid":2,"running_ns":5,"syncs":1}
//! -> {"cmd":"resume"}
//! <- {"ok":true}
//! -> {"cmd":"frob"}
//! <- {"error":"bad request: unknown variant `frob`, ...","kind":"bad-request","ok":false}
//! ```
//!
//! - [`protocol`]: the requests and the typed answers, shared by both sides.
//! - [`server`]: the socket, its connections and limits (`vmm run --api-sock`).
//! - [`client`]: [`call`] and friends, for the CLI, tests and benchmarks.
//!
//! The server's dispatch (`handlers`) and its streamed pagemap answers (`pagemap`) are
//! private to it.

pub mod client;
mod handlers;
mod pagemap;
pub mod protocol;
pub mod server;

pub use client::{call, call_streaming, call_with_progress, call_with_updates, ClientError, CLIENT_TIMEOUT};
pub use protocol::{
    Answer, DirtyRate, DumpCreated, ErrorKind, Failure, Heatmap, HeatmapProcess, HeatmapRow, Info, MappingInfo, Page, ScanRegion, PagemapFormat, PagemapHeader,
    PagemapPages, PagemapScanned, PagemapSummary, Paused, PhaseReply, ProcessInfo, ProcessRate, Processes, RefsCleared, Request,
    Resumed, SnapshotCreated, Status, MigrationCancelled, MigrationDone, RoundLine,
};
pub use server::{Error, Server, SocketFile, IDLE_TIMEOUT, MAX_CONNECTIONS, MAX_REQUEST, REQUEST_TIMEOUT, WRITE_TIMEOUT};
