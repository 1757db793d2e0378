//! The connection's transport: a byte stream to the server's [`Endpoint`],
//! split into a read half (for the handshake, then the reader task) and a write
//! half (for the handshake, then the connection's writer).

use std::io;

use super::config::Endpoint;
use crate::io::{BoxRead, BoxWrite};

pub(super) async fn dial(endpoint: &Endpoint) -> io::Result<(BoxRead, BoxWrite)> {
    match endpoint {
        Endpoint::Tcp(addr) => {
            let s = tokio::net::TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            let (r, w) = s.into_split();
            Ok((Box::new(r), Box::new(w)))
        }
        Endpoint::Unix(path) => {
            let s = tokio::net::UnixStream::connect(path).await?;
            let (r, w) = s.into_split();
            Ok((Box::new(r), Box::new(w)))
        }
    }
}
