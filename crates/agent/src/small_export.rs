//! Reading a small export whole (a manifest, a boot profile) from one
//! node's base server: what both [`crate::agent`] (`manifest/IMAGE`) and
//! [`crate::prefetch`] (`profile/IMAGE`) fetch from their list of sources.

use std::path::PathBuf;
use std::time::Duration;

use virtman_nbd::{Client, ClientConfig, ClientTls, Endpoint};

/// Reads a whole small export (a manifest, a boot profile) from `addr`;
/// returns a pseudo path naming it, for error messages, and its bytes.
/// Over TLS when `tls` is given (the server verified by `addr`'s host).
pub(crate) async fn read_small_export(
    addr: &str,
    export: &str,
    tls: Option<&ClientTls>,
) -> Result<(PathBuf, bytes::Bytes), String> {
    let cfg = ClientConfig {
        export: export.to_owned(),
        request_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(3),
        connections: 1,
        tls: tls.cloned(),
        // A member reading its peer's manifest or profile: a child's read.
        meta_contexts: vec![virtman_cache::X_VIRTMAN_PRESENT.to_owned()],
    };
    let c = Client::connect(&Endpoint::Tcp(addr.to_owned()), &cfg)
        .await
        .map_err(|e| e.to_string())?;
    let bytes = c.read(0, c.size()).await.map_err(|e| e.to_string())?;
    let _ = c.disconnect().await;
    Ok((PathBuf::from(format!("nbd://{addr}/{export}")), bytes))
}
