//! The IPC (Unix socket) transport for jsonrpsee's async client.

use std::fmt;
use std::io;
use std::path::Path;

use jsonrpsee::core::client::{ReceivedMessage, TransportReceiverT, TransportSenderT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use crate::framing::{FramingError, JsonStreamDecoder};

/// A failure of the IPC transport.
#[derive(Debug)]
pub(crate) enum IpcError {
    /// Reading or writing the socket failed.
    Io(io::Error),
    /// geth closed the connection.
    Closed {
        /// True when a message was cut off by the close.
        mid_message: bool,
    },
    /// The stream is not valid JSON.
    Framing(FramingError),
}

impl fmt::Display for IpcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IpcError::Io(e) => write!(f, "IPC socket I/O error: {e}"),
            IpcError::Closed { mid_message: false } => {
                f.write_str("geth closed the IPC connection")
            }
            IpcError::Closed { mid_message: true } => {
                f.write_str("geth closed the IPC connection in the middle of a message")
            }
            IpcError::Framing(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for IpcError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            IpcError::Io(e) => Some(e),
            IpcError::Framing(e) => Some(e),
            IpcError::Closed { .. } => None,
        }
    }
}

/// Writes requests: each as the JSON text followed by `\n`.
#[derive(Debug)]
pub(crate) struct IpcSender {
    write: OwnedWriteHalf,
}

impl TransportSenderT for IpcSender {
    type Error = IpcError;

    async fn send(&mut self, msg: String) -> Result<(), Self::Error> {
        let mut bytes = msg.into_bytes();
        bytes.push(b'\n');
        self.write.write_all(&bytes).await.map_err(IpcError::Io)?;
        self.write.flush().await.map_err(IpcError::Io)
    }

    async fn close(&mut self) -> Result<(), Self::Error> {
        self.write.shutdown().await.map_err(IpcError::Io)
    }
}

/// Reads responses and notifications, one JSON value per message.
#[derive(Debug)]
pub(crate) struct IpcReceiver {
    read: OwnedReadHalf,
    decoder: JsonStreamDecoder,
    chunk: Vec<u8>,
}

impl TransportReceiverT for IpcReceiver {
    type Error = IpcError;

    async fn receive(&mut self) -> Result<ReceivedMessage, Self::Error> {
        loop {
            if let Some(msg) = self.decoder.next_message().map_err(IpcError::Framing)? {
                return Ok(ReceivedMessage::Text(msg));
            }
            let n = self
                .read
                .read(&mut self.chunk)
                .await
                .map_err(IpcError::Io)?;
            if n == 0 {
                return Err(IpcError::Closed {
                    mid_message: self.decoder.has_partial(),
                });
            }
            self.decoder.push(&self.chunk[..n]);
        }
    }
}

/// Connects to the socket and splits it into the two halves jsonrpsee needs.
pub(crate) async fn connect(path: &Path) -> io::Result<(IpcSender, IpcReceiver)> {
    let stream = UnixStream::connect(path).await?;
    Ok(split(stream))
}

/// Whether the socket accepts a connection now (closed at once).
pub(crate) async fn accepts(path: &Path) -> bool {
    UnixStream::connect(path).await.is_ok()
}

/// Splits a connected stream into a sender and a receiver.
pub(crate) fn split(stream: UnixStream) -> (IpcSender, IpcReceiver) {
    let (read, write) = stream.into_split();
    (
        IpcSender { write },
        IpcReceiver {
            read,
            decoder: JsonStreamDecoder::default(),
            chunk: vec![0; 64 * 1024],
        },
    )
}
