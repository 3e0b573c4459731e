//! The accepted TCP connection, carrying what tokend remembers per connection: the
//! credential last checked on it ([`CredentialMemo`]). tonic hands each request a clone of
//! the connection's [`ConnectionInfo`] (under TLS, inside `TlsConnectInfo`).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::introspect::CredentialMemo;

/// A TCP connection to tokend's gRPC port.
#[derive(Debug)]
pub struct Connection {
    stream: TcpStream,
    memo: Arc<CredentialMemo>,
}

impl Connection {
    /// Wraps an accepted stream with an empty memo.
    pub fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            memo: Arc::default(),
        }
    }
}

/// What each request learns of its connection.
#[derive(Clone, Debug)]
pub struct ConnectionInfo {
    /// The addresses.
    pub tcp: TcpConnectInfo,
    /// The credential last checked on this connection.
    pub memo: Arc<CredentialMemo>,
}

impl Connected for Connection {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        ConnectionInfo {
            tcp: self.stream.connect_info(),
            memo: Arc::clone(&self.memo),
        }
    }
}

// Plain delegation. `is_write_vectored` matters: without it hyper copies every response
// into one buffer before writing it.
impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
