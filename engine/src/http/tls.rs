//! The server's connections: plain TCP, or TLS when a certificate is given. TLS offers HTTP/2
//! (EventStoreDB's gRPC clients need it) and HTTP/1.1 by ALPN. Handshakes run on tasks of their
//! own, so a slow or silent client holds up no one else's connection.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::server::TlsStream;
use tokio_util::either::Either;
use tokio_util::task::AbortOnDropHandle;

/// Longest a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections past their handshake waiting for the server to take them.
const HANDSHAKEN_QUEUE: usize = 128;
/// Handshakes in progress at once; past it, accepting waits for one to finish.
const MAX_HANDSHAKES: usize = 512;

/// A certificate chain and its private key, PEM files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub certificate: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// The server's TLS configuration: the certificate, HTTP/2 and HTTP/1.1 offered.
    pub fn server_config(&self) -> anyhow::Result<Arc<ServerConfig>> {
        let chain = read_chain(&self.certificate)?;
        let key = PrivateKeyDer::from_pem_file(&self.key).with_context(|| {
            format!("cannot read a PEM private key from {}", self.key.display())
        })?;
        // The provider is named, not taken from the process: the build may hold more than one.
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .context("the TLS certificate does not fit its key")?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

fn read_chain(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let chain = CertificateDer::pem_file_iter(path)
        .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("cannot read PEM certificates from {}", path.display()))?;
    anyhow::ensure!(!chain.is_empty(), "{} holds no certificate", path.display());
    Ok(chain)
}

/// What `axum::serve` takes connections from.
pub enum Incoming {
    Plain(TcpListener),
    Tls {
        handshaken: mpsc::Receiver<(TlsStream<Connection>, SocketAddr)>,
        local: SocketAddr,
        _accepting: AbortOnDropHandle<()>,
    },
}

impl Incoming {
    pub fn new(listener: TcpListener, tls: Option<Arc<ServerConfig>>) -> io::Result<Self> {
        let Some(config) = tls else {
            return Ok(Incoming::Plain(listener));
        };
        let local = listener.local_addr()?;
        let (sender, handshaken) = mpsc::channel(HANDSHAKEN_QUEUE);
        let accepting = tokio::spawn(accept_tls(listener, TlsAcceptor::from(config), sender));
        Ok(Incoming::Tls {
            handshaken,
            local,
            _accepting: AbortOnDropHandle::new(accepting),
        })
    }
}

async fn accept_tls(
    mut listener: TcpListener,
    acceptor: TlsAcceptor,
    handshaken: mpsc::Sender<(TlsStream<Connection>, SocketAddr)>,
) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    loop {
        let Ok(permit) = handshakes.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = axum::serve::Listener::accept(&mut listener).await;
        let stream = Connection::new(stream);
        let (acceptor, handshaken) = (acceptor.clone(), handshaken.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(mut stream)) => {
                    // The handshake's bytes said nothing of the protocol; ALPN does.
                    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                    stream.get_mut().0.quick_ack = Some(h2);
                    let _ = handshaken.send((stream, peer)).await;
                }
                Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

/// What an HTTP/2 client sends first, without TLS.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// An accepted TCP connection, set up for requests answered at once. Its small writes go out
/// at once (no Nagle: an HTTP/2 answer is several frames written one after the other), and an
/// HTTP/2 one acknowledges what it reads at once: a client that writes a request's headers and
/// body separately with Nagle's algorithm on (EventStoreDB's Rust client does) holds the body
/// until its headers are acknowledged, which a delayed ack would put off by 40 ms. HTTP/1.1
/// connections keep delayed acks, which cost them nothing and save packets.
pub struct Connection {
    stream: TcpStream,
    /// Acknowledge reads at once; `None` until the first bytes say whether this is HTTP/2.
    quick_ack: Option<bool>,
}

impl Connection {
    fn new(stream: TcpStream) -> Self {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
        Connection {
            stream,
            quick_ack: None,
        }
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let filled = buf.filled().len();
        let poll = Pin::new(&mut self.stream).poll_read(cx, buf);
        let read = &buf.filled()[filled..];
        if read.is_empty() {
            return poll;
        }
        let quick_ack = *self.quick_ack.get_or_insert_with(|| {
            let compared = read.len().min(H2_PREFACE.len());
            read[..compared] == H2_PREFACE[..compared]
        });
        // Linux leaves quick-ack mode on its own, so it is asked for again after each read.
        #[cfg(target_os = "linux")]
        if quick_ack {
            let _ = socket2::SockRef::from(&self.stream).set_tcp_quickack(true);
        }
        #[cfg(not(target_os = "linux"))]
        let _ = quick_ack;
        poll
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl axum::serve::Listener for Incoming {
    type Io = Either<Connection, TlsStream<Connection>>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, SocketAddr) {
        match self {
            Incoming::Plain(listener) => {
                let (stream, peer) = axum::serve::Listener::accept(listener).await;
                (Either::Left(Connection::new(stream)), peer)
            }
            Incoming::Tls { handshaken, .. } => match handshaken.recv().await {
                Some((stream, peer)) => (Either::Right(stream), peer),
                // The accepting task ended (it only does when aborted): take nothing more.
                None => std::future::pending().await,
            },
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Incoming::Plain(listener) => listener.local_addr(),
            Incoming::Tls { local, .. } => Ok(*local),
        }
    }
}
