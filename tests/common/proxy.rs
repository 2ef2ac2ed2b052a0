//! A TCP proxy on one link between two nodes, so a test can cut, delay or one-way-drop the
//! traffic one node sends another.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does with the traffic. Every change closes the connections open at the
/// time, as a network fault does to connections in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Passes everything.
    None,
    /// Refuses connections: a partition.
    Cut,
    /// Passes requests but never their answers: the sender never hears back.
    DropReplies,
    /// Holds every chunk this long before passing it on.
    Delay(Duration),
}

pub struct LinkProxy {
    /// `host:port` to send the link's traffic to.
    pub address: String,
    fault: Arc<watch::Sender<Fault>>,
}

impl LinkProxy {
    /// A proxy in front of `target` (`host:port`), passing everything until told otherwise.
    pub async fn start(target: String) -> LinkProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a proxy port");
        let address = listener.local_addr().expect("an address").to_string();
        let fault = Arc::new(watch::channel(Fault::None).0);
        let faults = fault.clone();
        tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    // Out of file descriptors, say: not a reason to spin.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let mut watch = faults.subscribe();
                let current = *watch.borrow_and_update();
                if current == Fault::Cut {
                    continue;
                }
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    let (inbound_read, inbound_write) = inbound.into_split();
                    let (outbound_read, outbound_write) = outbound.into_split();
                    tokio::select! {
                        _ = pump(inbound_read, outbound_write, current, false) => {}
                        _ = pump(outbound_read, inbound_write, current, true) => {}
                        _ = watch.changed() => {}
                    }
                });
            }
        });
        LinkProxy { address, fault }
    }

    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }
}

/// Copies one direction of a connection under `fault` until either side closes it.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, fault: Fault, replies: bool) {
    let mut buffer = vec![0; 64 << 10];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        match fault {
            Fault::DropReplies if replies => continue,
            Fault::Delay(delay) => tokio::time::sleep(delay).await,
            _ => {}
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}
