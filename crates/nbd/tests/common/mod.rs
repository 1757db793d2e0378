//! Helpers shared by the integration tests: an in-process server on
//! 127.0.0.1:0, and a raw protocol client that can send anything, including
//! what a well-behaved client never would.
#![allow(dead_code, clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use virtman_nbd::proto::handshake::{self as hs, GoRequest, MetaRequest};
use virtman_nbd::proto::transmission::{self as tm, Request};
use virtman_nbd::proto::{client_flags, opt, rep};
use virtman_nbd::{Export, Listener, Server, ServerConfig};
pub use virtman_testkit::pattern;

/// A server running in the test's runtime; stopped on drop.
pub struct TestServer {
    pub addr: SocketAddr,
    pub server: Arc<Server>,
    pub shutdown: CancellationToken,
    pub task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    pub async fn start(config: ServerConfig, exports: Vec<(&str, Arc<dyn Export>)>) -> TestServer {
        let server = Server::new(config);
        for (n, e) in exports {
            server.add_export(n, e);
        }
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(Arc::clone(&server).serve(Listener::Tcp(l), shutdown.clone()));
        TestServer {
            addr,
            server,
            shutdown,
            task: Some(task),
        }
    }

    pub fn endpoint(&self) -> virtman_nbd::Endpoint {
        virtman_nbd::Endpoint::Tcp(self.addr.to_string())
    }

    /// Stops the server and waits until every connection has ended.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(20), t)
                .await
                .expect("server did not stop")
                .unwrap()
                .unwrap();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A client that speaks the protocol byte by byte (over TCP, or over any
/// stream, such as TLS after STARTTLS).
pub struct Raw<S = TcpStream> {
    pub s: S,
}

/// A raw client over another stream.
pub type RawStream<S> = Raw<S>;

impl<S> Raw<S> {
    pub fn new(s: S) -> Raw<S> {
        Raw { s }
    }
}

impl Raw<TcpStream> {
    /// Connects and reads the greeting; does not send client flags.
    pub async fn connect(addr: SocketAddr) -> Raw {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut g = [0u8; hs::GREETING_LEN];
        s.read_exact(&mut g).await.unwrap();
        hs::decode_greeting(&g).unwrap();
        Raw { s }
    }

    /// Connects and sends the usual client flags.
    pub async fn start(addr: SocketAddr) -> Raw {
        let mut r = Raw::connect(addr).await;
        r.send(&(client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES).to_be_bytes())
            .await;
        r
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Raw<S> {
    pub async fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).await.unwrap();
    }

    pub async fn option(&mut self, code: u32, data: &[u8]) {
        let mut b = BytesMut::new();
        hs::encode_option(&mut b, code, data);
        self.send(&b).await;
    }

    /// Reads one option reply: (option, type, data).
    pub async fn reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; hs::OPTION_REPLY_HEADER_LEN];
        self.s.read_exact(&mut h).await.unwrap();
        let h = hs::decode_option_reply_header(&h).unwrap();
        let mut d = vec![0u8; h.length as usize];
        self.s.read_exact(&mut d).await.unwrap();
        (h.option, h.reply_type, d)
    }

    /// Reads option replies until a final one; returns all of them.
    pub async fn replies(&mut self) -> Vec<(u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        loop {
            let r = self.reply().await;
            let last = !matches!(r.1, rep::SERVER | rep::INFO | rep::META_CONTEXT);
            out.push(r);
            if last {
                return out;
            }
        }
    }

    /// Whether the server has closed the connection (reads EOF within 5 s).
    pub async fn closed(&mut self) -> bool {
        let mut b = [0u8; 1024];
        loop {
            match tokio::time::timeout(Duration::from_secs(5), self.s.read(&mut b)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    /// Negotiates structured replies and base:allocation, then GO.
    pub async fn go(&mut self, name: &str, structured: bool) {
        if structured {
            self.option(opt::STRUCTURED_REPLY, &[]).await;
            assert_eq!(self.reply().await.1, rep::ACK);
            let m = MetaRequest {
                name: name.into(),
                queries: vec!["base:allocation".into()],
            };
            self.option(opt::SET_META_CONTEXT, &m.encode()).await;
            let r = self.replies().await;
            assert_eq!(r.last().unwrap().1, rep::ACK);
        }
        let g = GoRequest {
            name: name.into(),
            requests: vec![],
        };
        self.option(opt::GO, &g.encode()).await;
        let r = self.replies().await;
        assert_eq!(r.last().unwrap().1, rep::ACK, "GO refused");
    }

    pub async fn request(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, length: u32) {
        let mut b = BytesMut::new();
        Request {
            flags,
            kind,
            cookie,
            offset,
            length,
        }
        .encode(&mut b);
        self.send(&b).await;
    }

    /// Reads one structured chunk: (flags, type, cookie, payload).
    pub async fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        let mut m = [0u8; 4];
        self.s.read_exact(&mut m).await.unwrap();
        let magic = u32::from_be_bytes(m);
        let n = tm::reply_header_rest(magic).unwrap();
        let mut rest = vec![0u8; n];
        self.s.read_exact(&mut rest).await.unwrap();
        match tm::decode_reply_header(magic, &rest).unwrap() {
            tm::ReplyHeader::Chunk {
                flags,
                ty,
                cookie,
                length,
            } => {
                let mut p = vec![0u8; length as usize];
                self.s.read_exact(&mut p).await.unwrap();
                (flags, ty, cookie, p)
            }
            tm::ReplyHeader::Simple { error, cookie } => {
                // Represent a simple reply as a pseudo chunk of type u16::MAX.
                (1, u16::MAX, cookie, error.to_be_bytes().to_vec())
            }
        }
    }

    /// Reads a reply to a non-read command and returns its errno (0 on success).
    pub async fn status(&mut self) -> (u64, u32) {
        let (_, ty, cookie, p) = self.chunk().await;
        if ty == u16::MAX {
            return (cookie, u32::from_be_bytes(p[..4].try_into().unwrap()));
        }
        if ty & 0x8000 != 0 {
            return (cookie, tm::decode_error(&p).unwrap().0);
        }
        (cookie, 0)
    }
}
