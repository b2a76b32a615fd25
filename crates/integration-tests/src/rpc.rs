//! A minimal raw JSON-RPC call over geth's IPC socket, independent of the
//! crate under test, so the harness's readiness checks cannot share its bugs.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{Error, Result};

/// Calls `method` with `params` on the IPC socket at `path` (5 s timeout) and
/// returns the `result`, or an error carrying geth's error object.
pub async fn ipc_call(path: &Path, method: &str, params: Value) -> Result<Value> {
    let fut = async {
        let mut s = tokio::net::UnixStream::connect(path)
            .await
            .map_err(|e| Error::Setup(format!("connect {}: {e}", path.display())))?;
        let req = json!({"jsonrpc":"2.0","id":1,"method":method,"params":params});
        s.write_all(req.to_string().as_bytes())
            .await
            .map_err(|e| Error::Setup(format!("write: {e}")))?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            let n = s
                .read(&mut chunk)
                .await
                .map_err(|e| Error::Setup(format!("read: {e}")))?;
            if n == 0 {
                return Err(Error::Setup(format!("{method}: connection closed")));
            }
            buf.extend_from_slice(&chunk[..n]);
            let mut stream = serde_json::Deserializer::from_slice(&buf).into_iter::<Value>();
            match stream.next() {
                Some(Ok(v)) => {
                    if let Some(err) = v.get("error") {
                        return Err(Error::Setup(format!("{method}: geth error {err}")));
                    }
                    return Ok(v.get("result").cloned().unwrap_or(Value::Null));
                }
                Some(Err(e)) if e.is_eof() => continue,
                Some(Err(e)) => return Err(Error::Setup(format!("{method}: bad JSON: {e}"))),
                None => continue,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .map_err(|_| Error::Timeout {
            what: format!("{method} over {}", path.display()),
            after: Duration::from_secs(5),
        })?
}
