//! The byte streams under connections: boxed read and write halves (so TCP,
//! unix sockets and TLS look the same to the handshake and transmission code),
//! and [`Joined`], which puts two halves back together for a TLS upgrade.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The read half of a connection.
pub type BoxRead = Box<dyn AsyncRead + Unpin + Send>;
/// The write half of a connection.
pub type BoxWrite = Box<dyn AsyncWrite + Unpin + Send>;

/// Two halves as one stream (what a TLS session runs over).
pub(crate) struct Joined {
    r: BoxRead,
    w: BoxWrite,
}

impl Joined {
    /// Takes a connection's halves, leaving closed ones in their place
    /// until the caller puts the upgraded halves back.
    pub(crate) fn take(r: &mut BoxRead, w: &mut BoxWrite) -> Joined {
        Joined {
            r: std::mem::replace(r, Box::new(tokio::io::empty())),
            w: std::mem::replace(w, Box::new(tokio::io::sink())),
        }
    }
}

impl AsyncRead for Joined {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.r).poll_read(cx, buf)
    }
}

impl AsyncWrite for Joined {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.w).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.w).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.w.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.w).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.w).poll_shutdown(cx)
    }
}

/// Splits any stream into boxed halves.
pub(crate) fn split<S>(stream: S) -> (BoxRead, BoxWrite)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (r, w) = tokio::io::split(stream);
    (Box::new(r), Box::new(w))
}
